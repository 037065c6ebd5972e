"""ingest: pairing, validation (the bad-input corpus), canonical orientation, resampling."""
from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, load_stage
from corpus import AFFINE, BAD_INPUTS, volumes, write_case
from ctsynth.core.config import params_from_dict
from ctsynth.core.errors import InputError
from ctsynth.core.labels import structure_index
from ctsynth.core.runner import stage_main
from ctsynth.data import ingest


def params_for(raw, **data):
    return params_from_dict({"data": {"source": "nifti", "raw_dir": str(raw), **data}})


def run_stage(tmp_path, raw, out, capsys, **data) -> tuple[int, str]:
    """Run the real stage entry point in-process; return (exit code, stderr)."""
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump({"data": {"source": "nifti", "raw_dir": str(raw), **data}}))
    stage = load_stage("ingest")
    with pytest.raises(SystemExit) as exit_info:
        stage_main("ingest", stage.main, stage.__doc__, add_args=stage.add_args,
                   argv=["--params", str(pfile), "--out", str(out)])
    return exit_info.value.code, capsys.readouterr().err


def test_good_pair_is_canonical_and_mapped(tmp_path):
    raw = tmp_path / "raw"
    write_case(raw, "p1")
    write_case(raw, "p2", seed=1)
    manifest = ingest.run(params_for(raw), tmp_path / "interim")
    assert list(manifest.case) == ["p1", "p2"]
    img = nib.load(str(tmp_path / "interim" / "p1_image.nii"))
    lab = nib.load(str(tmp_path / "interim" / "p1_label.nii"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    # LPS -> RAS flips x and y: the raw voxel [0, 0, z] lands at [-1, -1, z].
    _, raw_label = volumes()
    mapped = np.asanyarray(lab.dataobj)
    assert mapped[-3, -3, 4] == structure_index("Ao") and raw_label[2, 2, 4] == 820
    assert set(np.unique(mapped)) == {0, structure_index("LV"), structure_index("Ao")}
    row = manifest.iloc[0]
    assert (row.spacing_x, row.spacing_z) == (1.5, 2.5)
    assert row.vox_LV == int((raw_label == 500).sum()) and row.vox_Myo == 0
    assert row.orig_axcodes == "LPS"


def test_manifest_names_sources_relative_to_the_project_so_a_clone_s_place_does_not_change_it(tmp_path,
                                                                                                monkeypatch):
    """Sources under the working directory (the repo root) are recorded relative to it: two clones
    at different places write the same manifest. Sources elsewhere stay absolute."""
    manifests = []
    for place in ("clone_a", "clone_b/deeper"):
        root = tmp_path / place
        write_case(root / "raw", "p1")
        monkeypatch.chdir(root)
        ingest.run(params_for("raw"), root / "interim")
        manifests.append((root / "interim" / "manifest.csv").read_bytes())
    assert manifests[0] == manifests[1]
    row = pd.read_csv(tmp_path / "clone_a" / "interim" / "manifest.csv").iloc[0]
    assert (row.source_image, row.source_label) == ("raw/p1_image.nii.gz", "raw/p1_label.nii.gz")
    monkeypatch.chdir(tmp_path / "clone_b")
    outside = ingest.run(params_for(tmp_path / "clone_a" / "raw"), tmp_path / "elsewhere").iloc[0]
    assert outside.source_image == str(tmp_path / "clone_a" / "raw" / "p1_image.nii.gz")


def test_totalsegmentator_heartchambers_preset_maps_its_values(tmp_path):
    """TotalSegmentator's heartchambers_highres values (3 = LV, 6 = Ao) through the named preset; the
    same volume under the default MM-WHS map is refused with the values it does not know."""
    raw = tmp_path / "raw"
    _, label = volumes()
    label[label == 500], label[label == 820] = 3, 6
    write_case(raw, "ts", label=label)
    manifest = ingest.run(params_for(raw, label_map="totalsegmentator-heartchambers"), tmp_path / "interim")
    lab = np.asanyarray(nib.load(str(tmp_path / "interim" / "ts_label.nii")).dataobj)
    assert set(np.unique(lab)) == {0, structure_index("LV"), structure_index("Ao")}
    assert manifest.iloc[0].vox_LV == int((label == 3).sum()) and manifest.iloc[0].vox_Ao == int((label == 6).sum())
    with pytest.raises(InputError, match=r"ts_label.nii.gz.*\[3, 6\]"):
        ingest.run(params_for(raw, label_map="mmwhs"), tmp_path / "interim2")


def test_label_on_other_grid_is_resampled(tmp_path):
    raw = tmp_path / "raw"
    image, label = volumes()
    # Label at half resolution in-plane covering the same physical box.
    coarse = label[::2, ::2, :]
    coarse_affine = AFFINE.copy()
    coarse_affine[0, 0], coarse_affine[1, 1] = -3.0, -3.0
    coarse_affine[:3, 3] = [-0.75, -0.75, 0.0]   # voxel centres of the 2x2 blocks
    write_case(raw, "p1", image=image, label=coarse, label_affine=coarse_affine)
    manifest = ingest.run(params_for(raw), tmp_path / "interim")
    lab = np.asanyarray(nib.load(str(tmp_path / "interim" / "p1_label.nii")).dataobj)
    assert lab.shape == image.shape
    agreement = ((lab == structure_index("LV")) == (label[::-1, ::-1] == 500)).mean()
    assert agreement > 0.95 and manifest.vox_LV[0] > 0


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_clear_message_and_outputs_untouched(kind, tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "interim"
    write_case(raw, "good")
    assert run_stage(tmp_path, raw, out, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    fname, reason = BAD_INPUTS[kind](raw)
    code, err = run_stage(tmp_path, raw, out, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("ctsynth ingest:")]
    assert any(fname in ln and reason in ln for ln in lines), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # previous output intact
    assert not list(tmp_path.glob(".interim.*")), "temporary folder left behind"


def test_all_problems_reported_together(tmp_path):
    raw = tmp_path / "raw"
    write_case(raw, "good")
    BAD_INPUTS["empty_label"](raw)
    img, lab = volumes()
    write_case(raw, "bad2", image=np.full_like(img, 7))
    with pytest.raises(InputError) as e:
        ingest.run(params_for(raw), tmp_path / "interim")
    text = "\n".join(e.value.problems)
    assert "bad_label.nii.gz" in text and "bad2_image.nii.gz" in text


def test_on_error_skip_keeps_good_cases(tmp_path):
    raw = tmp_path / "raw"
    write_case(raw, "good")
    BAD_INPUTS["nan_voxels"](raw)
    manifest = ingest.run(params_for(raw, on_error="skip"), tmp_path / "interim")
    assert list(manifest.case) == ["good"]


def test_skip_fails_when_nothing_left(tmp_path):
    raw = tmp_path / "raw"
    BAD_INPUTS["constant_image"](raw)
    with pytest.raises(InputError, match="no usable case left"):
        ingest.run(params_for(raw, on_error="skip"), tmp_path / "interim")


def test_unknown_labels_to_background(tmp_path):
    raw = tmp_path / "raw"
    BAD_INPUTS["unknown_labels"](raw)
    ingest.run(params_for(raw, unknown_labels="background"), tmp_path / "interim")
    lab = np.asanyarray(nib.load(str(tmp_path / "interim" / "bad_label.nii")).dataobj)
    assert set(np.unique(lab)) == {0, structure_index("LV"), structure_index("Ao")}


def test_empty_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(InputError, match="no cases found"):
        ingest.run(params_for(tmp_path / "raw"), tmp_path / "interim")


def test_stage_subprocess_exit_code_and_debug_traceback(tmp_path):
    raw = tmp_path / "raw"
    BAD_INPUTS["zero_bytes"](raw)
    pfile = tmp_path / "p.yaml"
    pfile.write_text(yaml.safe_dump({"data": {"source": "nifti", "raw_dir": str(raw)}}))
    cmd = [sys.executable, str(REPO / "stages" / "ingest.py"), "--params", str(pfile),
           "--out", str(tmp_path / "interim")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert "bad_image.nii.gz: empty file" in quiet.stderr
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_real_scan_fixture_with_custom_label_map(tmp_path, real_raw):
    """A real contrast CT (LPS, int16 HU) with an aorta mask labelled 1."""
    raw = real_raw
    params = params_from_dict({"data": {"source": "nifti", "raw_dir": str(raw), "label_map": {1: "Ao"}},
                               "preprocess": {"structures": ["Ao"], "image_size": 64}})
    manifest = ingest.run(params, tmp_path / "interim")
    row = manifest.iloc[0]
    assert row.orig_axcodes == "LPS"
    assert (row.shape_x, row.shape_y, row.shape_z) == (120, 126, 164)
    assert row.hu_min < -1000 and row.hu_max > 3000
    assert row.vox_Ao > 1000 and row.vox_LV == 0
    img = nib.load(str(tmp_path / "interim" / "real_image.nii"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    lab = np.asanyarray(nib.load(str(tmp_path / "interim" / "real_label.nii")).dataobj)
    hu = np.asanyarray(img.dataobj)
    assert 200 < np.median(hu[lab == structure_index("Ao")]) < 500   # contrast-filled aorta
    pd.testing.assert_series_equal(manifest.case, pd.Series(["real"], name="case"))


def _crop_affine(start):
    """Affine of a label grid whose voxel 0 sits at image voxel ``start`` (same spacing)."""
    affine = AFFINE.copy()
    affine[:3, 3] = AFFINE[:3, :3] @ np.asarray(start, float) + AFFINE[:3, 3]
    return affine


def test_label_cropped_to_a_region_is_accepted_with_background_outside(tmp_path, caplog):
    raw = tmp_path / "raw"
    image, label = volumes()                                     # 24 × 24 × 8
    crop = label[4:20, 4:20, 2:6]                                # a box around the heart: 22 % of the image
    write_case(raw, "p1", image=image, label=crop, label_affine=_crop_affine([4, 4, 2]))
    with caplog.at_level("INFO", logger="ctsynth.data.ingest"):
        manifest = ingest.run(params_for(raw), tmp_path / "interim")
    lab = np.asanyarray(nib.load(str(tmp_path / "interim" / "p1_label.nii")).dataobj)
    expected = np.zeros_like(label)
    expected[4:20, 4:20, 2:6] = crop
    expected = expected[::-1, ::-1]                               # LPS -> RAS
    assert lab.shape == image.shape
    assert np.array_equal(lab == structure_index("LV"), expected == 500)
    assert np.array_equal(lab == structure_index("Ao"), expected == 820)
    assert manifest.vox_LV[0] == int((crop == 500).sum())
    lines = [r.getMessage() for r in caplog.records if "label on another grid" in r.getMessage()]
    assert len(lines) == 1 and "covers 22% of the image" in lines[0] and "100% of the label grid inside" in lines[0]


def test_label_grid_mostly_outside_the_image_is_an_error_naming_the_fraction(tmp_path):
    raw = tmp_path / "raw"
    image, label = volumes()
    # same size, shifted by half the image in x and y: 3/4 of the label grid lies outside
    write_case(raw, "p1", image=image, label=label, label_affine=_crop_affine([12, 12, 0]))
    with pytest.raises(InputError) as err:
        ingest.run(params_for(raw), tmp_path / "interim")
    text = "\n".join(err.value.problems)
    assert "p1_label.nii.gz: label grid does not overlap the image: 75% of the label grid lies outside" in text
    assert "covers 25% of the image" in text
    assert not (tmp_path / "interim").exists()


def test_label_grid_partly_outside_warns_about_dropped_labels(tmp_path, caplog):
    raw = tmp_path / "raw"
    image, label = volumes()
    write_case(raw, "p1", image=image, label=label, label_affine=_crop_affine([-3, 0, 0]))   # 1/8 outside
    with caplog.at_level("INFO", logger="ctsynth.data.ingest"):
        ingest.run(params_for(raw), tmp_path / "interim")
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "88% of the label grid inside" in messages
    ao = (label == 820)
    share = ao[:3].sum() / (label > 0).sum()                       # Ao voxels at x < 3 fall off the image
    assert f"{100 * share:.1f}% of the labelled voxels lie outside the image" in messages
