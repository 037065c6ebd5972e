"""synthesize: the 3-D spatial draw (geometry, rejection), the dataset writer (both layouts,
ingestible, repeatable), the stage and `ctsynth synthesize` with bad input."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_params
from ctsynth.core.config import SynthesizeCfg, params_from_dict
from ctsynth.core.errors import ConfigError, InputError, ModelFileError
from ctsynth.core.labels import MMWHS_LABEL_MAP, STRUCTURES
from ctsynth.data import ingest
from ctsynth.synth import synthesize as syn
from ctsynth.synth.inference import MaskToCT, load_model
from test_generate import make_world, save_tiny_model

SPACING = (2.0, 2.0, 3.0)


def _still(**kw) -> syn.Draw:
    d = {"rotation_deg": np.zeros(3), "scale": np.ones(3), "shift_mm": np.zeros(3), "deform_mm": np.zeros((3, 2, 2, 2))}
    d.update({k: np.asarray(v, float) for k, v in kw.items()})
    return syn.Draw(**d)


def _blobs(shape=(24, 20, 10)) -> np.ndarray:
    vol = np.zeros(shape, np.uint8)
    vol[8:14, 6:12, 3:7] = 3                       # LV
    vol[15:18, 12:16, 2:8] = 6                     # Ao
    return vol


# ------------------------------------------------------------------------------ the draw

def test_identity_draw_returns_the_labels_unchanged():
    vol = _blobs()
    assert np.array_equal(syn.warp_labels(vol, SPACING, _still()), vol)


def test_translation_moves_the_labels_by_that_many_voxels():
    vol = _blobs()
    out = syn.warp_labels(vol, SPACING, _still(shift_mm=[2 * SPACING[0], 0, -SPACING[2]]))   # +2 x, -1 z
    assert np.array_equal(out[2:, :, :-1], vol[:-2, :, 1:])
    assert out.dtype == np.uint8 and set(np.unique(out)) <= set(np.unique(vol))


def test_rotation_about_z_keeps_z_and_turns_x_into_y():
    vol = np.zeros((21, 21, 5), np.uint8)
    vol[16:19, 9:12, 2] = 3                                                        # on the +x side
    out = syn.warp_labels(vol, (1.0, 1.0, 1.0), _still(rotation_deg=[0, 0, 90]))
    xs, ys, zs = np.nonzero(out == 3)
    assert set(zs) == {2} and abs(xs.mean() - 10) < 1.5 and abs(ys.mean() - 10) > 5


def test_deformation_is_smooth_and_bounded():
    cfg = SynthesizeCfg(rotation_deg=[0, 0, 0], scale=[1, 1], shift_mm=[0, 0, 0], deform_mm=4.0, deform_grid_mm=20)
    draw = syn.draw_transform(np.random.default_rng(0), cfg, np.array([46.0, 38.0, 27.0]))
    grid = syn.sampling_grid((24, 20, 10), SPACING, draw)[0].numpy()          # (X, Y, Z, 3) (z, y, x) order
    ident = syn.sampling_grid((24, 20, 10), SPACING, _still())[0].numpy()
    shift_vox = (grid - ident)[..., 2] * (24 - 1) / 2                              # x displacement, voxels
    assert 0 < np.abs(shift_vox).max() <= 4.0 / SPACING[0] + 1e-4
    assert np.abs(np.diff(shift_vox, axis=0)).max() < 0.5                          # smooth: no jumps


def test_topology_problems_name_vanished_and_split_structures():
    src = _blobs()
    gone = src.copy()
    gone[gone == 6] = 0
    split = src.copy()
    split[10, :, :][split[10, :, :] == 3] = 0                                    # cut LV in two along x
    assert syn.topology_problems(src, src, [3, 6]) == []
    assert any("Ao vanished" in p for p in syn.topology_problems(src, gone, [3, 6]))
    assert any("LV split into 2 pieces (source: 1)" in p for p in syn.topology_problems(src, split, [3, 6]))


def test_rejected_draws_are_redrawn_and_counted():
    vol = np.zeros((20, 20, 8), np.uint8)
    vol[0:3, 8:12, 2:6] = 3                                                        # LV at the edge
    cfg = SynthesizeCfg(shift_mm=[12.0, 0, 0], rotation_deg=[0, 0, 0], deform_mm=0.0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    attempts = []
    for i in range(12):
        warped, draw, attempt = syn._accepted_draw(vol, affine, cfg, i, "edge", [3])
        assert syn.topology_problems(vol, warped, [3]) == []
        attempts.append(attempt)
    assert max(attempts) > 1                                           # some draws pushed LV out


def test_no_acceptable_draw_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(syn, "topology_problems", lambda *a: ["LV vanished (0 of 10 voxels left)"])
    with pytest.raises(InputError, match=r"case_9: no acceptable spatial draw in 3 attempts.*LV vanished"):
        syn._accepted_draw(_blobs(), np.eye(4), SynthesizeCfg(max_attempts=3), 0, "case_9", [3])


# ------------------------------------------------------------------------------ the stage

@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path)


def _stage(world, out, **synth):
    params = tiny_params(synthesize={"cases": 3, **synth})
    return syn.run(params, world["model"], world["interim"], world["split"], out)


def test_stage_writes_ingestible_pairs_from_training_cases_only(world, tmp_path):
    out = tmp_path / "synthetic"
    manifest = _stage(world, out)
    assert list(manifest.case) == ["synth_0001", "synth_0002", "synth_0003"]
    assert set(manifest.source) == {"p3", "p4"}                        # the split's train cases, never test
    assert list(manifest.draw_seed) == ["1:0", "1:1", "1:2"]
    on_disk = pd.read_csv(out / "manifest.csv")
    assert list(on_disk.case) == list(manifest.case)
    for row in manifest.itertuples():
        image, label = nib.load(str(out / row.image_file)), nib.load(str(out / row.label_file))
        source = nib.load(str(world["interim"] / f"{row.source}_label.nii"))
        assert image.shape == label.shape == source.shape and np.allclose(label.affine, source.affine)
        assert image.get_data_dtype() == np.int16
        zooms = source.header.get_zooms()                      # the CT is drawn at model_size², then resized
        assert (row.spacing_x_mm, row.spacing_y_mm) == pytest.approx(zooms[:2], abs=1e-4)
        assert row.effective_spacing_x_mm == pytest.approx(max(zooms[0], zooms[0] * image.shape[0] / row.model_size),
                                                           abs=1e-4)
        assert row.effective_spacing_y_mm == pytest.approx(max(zooms[1], zooms[1] * image.shape[1] / row.model_size),
                                                           abs=1e-4)
        hu = np.asanyarray(image.dataobj)
        assert -1000 <= hu.min() and hu.max() <= 1000
        values = set(np.unique(np.asanyarray(label.dataobj)).tolist())
        assert values - {0} and values <= {0} | set(MMWHS_LABEL_MAP)      # raw MM-WHS values
    interim = ingest.run(params_from_dict({"data": {"source": "nifti", "raw_dir": str(out)}}), tmp_path / "re")
    assert sorted(interim.case) == sorted(manifest.case)


def test_stage_is_repeatable_and_the_seed_matters(world, tmp_path):
    a, b = _stage(world, tmp_path / "a"), _stage(world, tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)
    for row in a.itertuples():
        for f in (row.image_file, row.label_file):
            assert np.array_equal(nib.load(str(tmp_path / "a" / f)).get_fdata(),
                                  nib.load(str(tmp_path / "b" / f)).get_fdata())
    c = _stage(world, tmp_path / "c", seed=2)
    assert not np.allclose(a.rot_z_deg, c.rot_z_deg)


def test_stage_refuses_a_model_of_another_structure_set(world, tmp_path):
    save_tiny_model(world["model"], structures=["Ao", "PA"])
    with pytest.raises(ModelFileError, match=r"trained for structures \['Ao', 'PA'\].*preprocess.structures"):
        _stage(world, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ folders, layouts, CLI

def _label_folder(root: Path, n=2) -> Path:
    root.mkdir()
    for i in range(n):
        vol = _blobs()
        raw = np.zeros(vol.shape, np.uint16)
        raw[vol == 3], raw[vol == 6] = 500, 820
        nib.save(nib.Nifti1Image(raw, np.diag([-2.0, -2.0, 3.0, 1.0])), str(root / f"m{i}.nii.gz"))
    return root


def test_nnunet_layout(world, tmp_path):
    labels = _label_folder(tmp_path / "masks")
    out = tmp_path / "nn"
    manifest = syn.synthesize_folder(world["model"], labels, out, cases=3, layout="nnunet", structures=["LV", "Ao"])
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "LV": 1, "Ao": 2}
    assert dataset["numTraining"] == 3 and dataset["channel_names"] == {"0": "CT"}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"synth_000{i}_0000.nii.gz" for i in (1, 2, 3)]
    for case in manifest.case:
        lab = nib.load(str(out / "labelsTr" / f"{case}.nii.gz"))
        assert set(np.unique(np.asanyarray(lab.dataobj)).tolist()) == {0, 1, 2}
        assert nib.aff2axcodes(lab.affine) == ("L", "P", "S")         # the source's orientation
    assert set(manifest.source) == {"m0", "m1"}


def _cli(args, capsys):
    from ctsynth.cli import main

    with pytest.raises(SystemExit) as e:
        main(["synthesize", *map(str, args)])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["zero cases", "empty folder", "no labels", "unknown labels", "other structures"])
def test_cli_bad_input_is_one_line_and_exit_2(world, tmp_path, capsys, case):
    masks = _label_folder(tmp_path / "masks")
    model, extra = world["model"], []
    if case == "zero cases":
        extra, want = ["--cases", "0"], "--cases: must be a whole number >= 1, got 0"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        masks, want = tmp_path / "empty", "no label NIfTI files matching"
    elif case == "no labels":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint16), np.eye(4)), str(masks / "blank.nii.gz"))
        want = "blank.nii.gz: mask has none of the expected label values"
    elif case == "unknown labels":
        vol = np.zeros((8, 8, 4), np.uint16)
        vol[2:5, 2:5, 1:3], vol[5:7, 5:7, 1:3] = 500, 999
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(masks / "odd.nii.gz"))
        want = "odd.nii.gz: label values [999] are not in the label map"
    else:
        model = save_tiny_model(tmp_path / "ao.pt", structures=["Ao", "PA"])
        extra, want = ["--structures", "LV"], "--structures: ['LV'] not among the model's structures"
    code, err = _cli(["--model", model, "--labels", masks, "--out", tmp_path / "out", *extra], capsys)
    lines = [ln for ln in err.splitlines() if "ctsynth synthesize:" in ln]
    assert code == 2 and len(lines) == 1 and want in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_cli_writes_pairs(world, tmp_path, capsys):
    masks = _label_folder(tmp_path / "masks", n=1)
    code, err = _cli(["--model", world["model"], "--labels", masks, "--out", tmp_path / "out", "--cases", 2], capsys)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["manifest.csv", "synth_0001_image.nii.gz", "synth_0001_label.nii.gz",
                     "synth_0002_image.nii.gz", "synth_0002_label.nii.gz"]


def test_failed_run_keeps_the_previous_output(world, tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    _stage(world, out)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(MaskToCT, "volume", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _stage(world, out, cases=5)
    assert sorted(p.name for p in out.iterdir()) == before


def test_output_values():
    assert syn.output_values([3, 6], dict(MMWHS_LABEL_MAP), "pairs") == {3: 500, 6: 820}
    assert syn.output_values([3, 6], dict(MMWHS_LABEL_MAP), "nnunet") == {3: 1, 6: 2}
    assert syn.output_values([1], {7: "Myo", 5: "Myo"}, "pairs") == {1: 5}


def test_dataset_json_names_the_channel_by_modality(tmp_path):
    """nnU-Net normalises a "CT" channel by HU statistics: an MR dataset must not be called CT."""
    for meta, want in (({}, "CT"), ({"modality": "ct"}, "CT"), ({"modality": "mr"}, "MR")):
        syn.write_dataset_json(tmp_path, {3: 1}, 1, meta)
        dataset = json.loads((tmp_path / "dataset.json").read_text())
        assert dataset["channel_names"] == {"0": want} and f"synthetic {want} " in dataset["description"]


def test_params_ranges_are_validated():
    with pytest.raises(ConfigError) as e:
        params_from_dict({"synthesize": {"cases": 0, "scale": [1.2, 0.8], "rotation_deg": [90, 0, 0],
                                         "deform_grid_mm": 0}})
    text = "\n".join(e.value.problems)
    for fragment in ("synthesize.cases", "synthesize.scale", "synthesize.rotation_deg", "deform_grid_mm"):
        assert fragment in text


def test_model_structures_drive_the_kept_labels(world):
    model, meta = load_model(world["model"])
    assert MaskToCT(model, meta).keep == list(range(1, len(STRUCTURES) + 1))
