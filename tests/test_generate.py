"""generate: test-set stage outputs, volume geometry (reorientation) and the `ctsynth generate` core."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import REAL_CT, tiny_params, train_on_raw
from ctsynth.core import io as cio
from ctsynth.core.errors import ConfigError, InputError, ModelFileError
from ctsynth.core.labels import MMWHS_LABEL_MAP, STRUCTURES
from ctsynth.data import masks
from ctsynth.data.preprocess import kept_indices, prepare_slice
from ctsynth.data.store import ProcessedStore
from ctsynth.synth import generate as gen
from ctsynth.synth import inference
from ctsynth.train.networks import build_generator, save_generator

SIZE = 32
WINDOW = [-1000.0, 1000.0]
LPS = np.diag([-2.0, -2.0, 3.0, 1.0])
LPS[:3, 3] = [40.0, 30.0, -10.0]
# Voxel axes permuted: i -> world A (flipped), j -> world R, k -> world S.
PERMUTED = np.array([[0.0, 2.0, 0, -5], [-2.0, 0, 0, 7], [0, 0, 3.0, 1], [0, 0, 0, 1]])


def save_tiny_model(path: Path, structures=STRUCTURES, label_map=None, encoding="onehot") -> Path:
    cfg = tiny_params(model={"encoding": encoding}).model
    in_ch = len(structures) if encoding == "onehot" else 1
    g = build_generator(cfg, in_ch)
    save_generator(path, g, cfg, in_ch, {
        "image_size": SIZE, "hu_window": WINDOW, "structures": list(structures),
        "label_map": label_map or {str(k): v for k, v in MMWHS_LABEL_MAP.items()}, "encoding": encoding})
    return path


def _orig_label(shape, seed):
    """Original-grid structure-index volume: a few blobs, empty first/last slices."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    x, y = np.mgrid[: shape[0], : shape[1]]
    for idx in (3, 6, 1):
        cx, cy, r = rng.uniform(0.3, 0.7) * shape[0], rng.uniform(0.3, 0.7) * shape[1], shape[0] / 6
        lab[((x - cx) ** 2 + (y - cy) ** 2 < r ** 2), 1:-1] = idx
    return lab


def make_world(root: Path, affines=None) -> dict:
    """Interim canonical volumes + processed store + split, as ingest/preprocess/split write them.

    Cases on non-RAS grids (LPS, permuted) prove that volumes go back to the original grid."""
    affines = affines or {"p1": LPS, "p2": PERMUTED, "p3": LPS, "p4": np.diag([2.0, 2.0, 3.0, 1])}
    interim, processed = root / "interim", root / "processed"
    interim.mkdir(parents=True)
    images, masks, rows, meta_cases, manifest = [], [], [], {}, []
    for n, (case, aff) in enumerate(affines.items()):
        orig_shape = (40, 36, 7)
        lab = _orig_label(orig_shape, n)
        hu = np.where(lab > 0, 300, -800).astype(np.int16)
        label_c = nib.as_closest_canonical(nib.Nifti1Image(lab, aff))
        image_c = nib.as_closest_canonical(nib.Nifti1Image(hu, aff))
        nib.save(label_c, str(interim / f"{case}_label.nii"))
        nib.save(image_c, str(interim / f"{case}_image.nii"))
        lab_c, hu_c = np.asanyarray(label_c.dataobj), np.asanyarray(image_c.dataobj)
        zs = [z for z in range(lab_c.shape[2]) if lab_c[:, :, z].any()]
        for z in zs:
            im, m = prepare_slice(hu_c[:, :, z].astype(np.float32), lab_c[:, :, z], SIZE, WINDOW,
                                  kept_indices(list(STRUCTURES)))
            images.append(im), masks.append(m), rows.append({"case": case, "z": z})
        meta_cases[case] = {"shape": list(lab_c.shape), "affine": label_c.affine.tolist(),
                            "orig_affine": aff.tolist(), "orig_shape": list(orig_shape), "z": zs}
        manifest.append({"case": case, "image_file": f"{case}_image.nii", "label_file": f"{case}_label.nii"})
    processed.mkdir()
    np.save(processed / "images.npy", np.stack(images).astype(np.float16))
    np.save(processed / "masks.npy", np.stack(masks))
    pd.DataFrame(rows).to_csv(processed / "slices.csv", index=False)
    pd.DataFrame(manifest).to_csv(interim / "manifest.csv", index=False)
    (processed / "meta.json").write_text(json.dumps({
        "image_size": SIZE, "hu_window": WINDOW, "structures": list(STRUCTURES), "slices": "structures",
        "margin": 0, "label_map": {str(k): v for k, v in MMWHS_LABEL_MAP.items()}, "cases": meta_cases}))
    split = root / "split.json"
    split.write_text(json.dumps({"seed": 0, "train": ["p3", "p4"], "val": [], "test": ["p1", "p2"]}))
    model = save_tiny_model(root / "generator.pt")
    return {"interim": interim, "processed": processed, "split": split, "model": model,
            "affines": affines, "out": root / "generated"}


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path)


def run_stage(w, **params):
    params.setdefault("generate", {}).setdefault("grid_slices", 2)
    return gen.run(tiny_params(**params), w["model"], w["processed"], w["split"],
                                 w["interim"], w["out"])


# ------------------------------------------------------------------------------ the stage

def test_generate_test_set_outputs(world):
    stats = run_stage(world, generate={"batch_size": 3, "grid_slices": 3})
    out, store = world["out"], ProcessedStore(world["processed"])
    fake, index = np.load(out / "fake.npy"), np.load(out / "index.npy")
    assert fake.dtype == np.float16 and index.dtype == np.int64
    assert fake.shape == (len(index), SIZE, SIZE) and stats["slices"] == len(index)
    assert np.array_equal(index, store.rows_for_cases(["p1", "p2"]))      # test rows only, in order
    assert set(store.slices.case.to_numpy()[index]) == {"p1", "p2"}
    assert np.all(np.abs(fake.astype(np.float32)) <= 1)
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["p1.png", "p2.png"]
    for case in ("p1", "p2"):
        img = nib.load(str(out / f"{case}_synth.nii.gz"))
        assert img.shape == (40, 36, 7)
        np.testing.assert_allclose(img.affine, world["affines"][case], atol=1e-5)
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(world["affines"][case])
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.int16 and WINDOW[0] <= data.min() and data.max() <= WINDOW[1]
    assert not list(out.parent.glob(".generated.*"))                      # no temp dirs left
    prov = json.loads((out / "model.json").read_text())                   # which training, on what machine
    assert prov["generate_runtime"]["device"] == "cpu" and set(prov["generator"]) >= {"step", "seed", "runtime"}

    # A failing rerun leaves the previous outputs exactly as they were.
    before = (out / "fake.npy").read_bytes()
    (world["interim"] / "p2_label.nii").unlink()
    with pytest.raises(InputError, match="p2_label.nii"):
        run_stage(world)
    assert (out / "fake.npy").read_bytes() == before and (out / "p2_synth.nii.gz").exists()
    assert not list(out.parent.glob(".generated.*"))


def test_batch_size_does_not_change_results(world):
    """eval mode (no batch statistics): one slice at a time == all at once."""
    model, meta = inference.load_model(world["model"])
    masks = np.load(world["processed"] / "masks.npy")
    one = inference.MaskToCT(model, meta, batch_size=1).unit(masks)
    many = inference.MaskToCT(model, meta, batch_size=64).unit(masks)
    assert one.shape == masks.shape and one.dtype == np.float32
    np.testing.assert_allclose(one, many, atol=1e-4)


def test_volume_geometry_follows_the_mask(world, monkeypatch):
    """With a 'generator' that paints structures bright, the synthetic volume must light up exactly
    where the ORIGINAL-grid label is: proves canonical -> original reorientation and resizing."""
    def paint(self, masks, levels=None, anatomy=None, keys=None):                        # (N, 2k+1, S, S): centre slice
        centre = masks[:, masks.shape[1] // 2] if masks.ndim == 4 else masks
        return np.where(centre > 0, 0.5, -0.8).astype(np.float32)            # 500 HU / -800 HU
    monkeypatch.setattr(inference.MaskToCT, "unit", paint)
    run_stage(world)
    for n, case in enumerate(("p1", "p2")):
        vol = np.asanyarray(nib.load(str(world["out"] / f"{case}_synth.nii.gz")).dataobj)
        truth = _orig_label((40, 36, 7), n) > 0
        bright = vol > 0
        dice = 2 * (bright & truth).sum() / (bright.sum() + truth.sum())
        assert dice > 0.85, (case, dice)
        assert not bright[:, :, 0].any() and not bright[:, :, -1].any()   # empty slices stay empty


@pytest.mark.parametrize("affine", [LPS, PERMUTED, np.diag([1.0, -1, -1, 1]),
                                    np.array([[0, 0, 2.0, 0], [0, -1.0, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])])
def test_canonical_round_trip(affine):
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    assert np.array_equal(cio.to_canonical(data, affine), np.asanyarray(canon.dataobj))
    assert np.array_equal(cio.from_canonical(cio.to_canonical(data, affine), affine), data)


def test_stage_refuses_mismatched_model(world, tmp_path):
    other = tmp_path / "other.pt"
    cfg = tiny_params().model
    save_generator(other, build_generator(cfg, 1), cfg, 1, {"image_size": SIZE, "hu_window": WINDOW,
                   "structures": ["Ao"], "label_map": {"1": "Ao"}, "encoding": "onehot"})
    with pytest.raises(ModelFileError, match="structures"):
        gen.run(tiny_params(), other, world["processed"], world["split"],
                              world["interim"], world["out"])
    assert not world["out"].exists()


def test_stage_script(world, tmp_path, monkeypatch, capsys):
    """The thin stage script through stage_main: exit 0, then a clean one-line user error (exit 2)."""
    import runpy
    import sys

    params = tmp_path / "params.yaml"
    params.write_text("preprocess: {image_size: 32}\nmodel: {gen_depth: 5, ngf: 8, ndf: 8, disc_layers: 2}\n"
                      "generate: {grid_slices: 2}\n")
    script = str(Path(__file__).resolve().parents[1] / "stages" / "generate.py")
    monkeypatch.chdir(tmp_path)

    def run(model):
        monkeypatch.setattr(sys, "argv", [script, "--params", str(params), "--model", str(model),
                                          "--processed", str(world["processed"]), "--split", str(world["split"]),
                                          "--interim", str(world["interim"]), "--out", str(world["out"])])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(script, run_name="__main__")
        return e.value.code, capsys.readouterr().err

    code, err = run(world["model"])
    assert code == 0 and "slices/s" in err
    code, err = run(tmp_path / "nope.pt")
    assert code == 2 and "nope.pt" in err and "not found" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ the CLI core

@pytest.fixture
def ao_model(tmp_path):
    return save_tiny_model(tmp_path / "ao.pt", structures=["Ao", "PA"], label_map={"820": "Ao", "850": "PA"})


def test_synthesize_real_scan_round_trip(ao_model, tmp_path):
    mask = REAL_CT / "aorta_label.nii.gz"
    out = tmp_path / "synth.nii.gz"
    stats = inference.generate_file(ao_model, mask, out, label_map='{"1": "Ao"}')
    src, res = nib.load(str(mask)), nib.load(str(out))
    assert res.shape == src.shape and np.allclose(res.affine, src.affine)
    assert nib.aff2axcodes(res.affine) == ("L", "P", "S")
    data = np.asanyarray(res.dataobj)
    assert data.dtype == np.int16 and WINDOW[0] <= data.min() and data.max() <= WINDOW[1]
    assert stats["used"] == {1: "Ao"} and stats["slices"] == src.shape[2]


def test_cli_generate(ao_model, tmp_path, capsys):
    from ctsynth.cli import main

    out = tmp_path / "cli.nii.gz"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ao_model), "--mask", str(REAL_CT / "aorta_label.nii.gz"),
              "--out", str(out), "--label-map", '{"1": "Ao"}', "--structures", "Ao"])
    assert e.value.code == 0 and out.exists()
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ao_model), "--mask", str(REAL_CT / "aorta_label.nii.gz"),
              "--out", str(tmp_path / "x.nii.gz")])                      # model map: 820/850, mask holds 1
    err = capsys.readouterr().err
    assert e.value.code == 2 and "aorta_label.nii.gz" in err and "none of the expected" in err
    assert "Traceback" not in err and not (tmp_path / "x.nii.gz").exists()


def _mask(path: Path, data, affine=LPS) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _blob(shape=(20, 20, 4), value=820, dtype=np.uint16):
    m = np.zeros(shape, dtype)
    m[5:12, 6:14, 1:3] = value
    return m


def test_synthesize_mmwhs_mask_in_lps(tmp_path):
    model = save_tiny_model(tmp_path / "m.pt")
    mask = _mask(tmp_path / "mask.nii.gz", _blob(value=500) + _blob(value=205) * 0)
    out = tmp_path / "o.nii.gz"
    inference.generate_file(model, mask, out, structures=["LV", "Ao"])
    res = nib.load(str(out))
    assert res.shape == (20, 20, 4) and np.allclose(res.affine, LPS)


@pytest.mark.parametrize("content,match", [(None, "not found"), (b"garbage" * 50, "not a readable model")])
def test_bad_model_file(tmp_path, content, match):
    model = tmp_path / "model.pt"
    if content is not None:
        model.write_bytes(content)
    mask = _mask(tmp_path / "m.nii.gz", _blob())
    with pytest.raises(ModelFileError, match=match) as e:
        inference.generate_file(model, mask, tmp_path / "o.nii.gz")
    assert "model.pt" in str(e.value)


def test_mask_without_known_labels(ao_model, tmp_path):
    mask = _mask(tmp_path / "nolabels.nii.gz", _blob(value=3) + _blob((20, 20, 4), 0))
    with pytest.raises(InputError) as e:
        inference.generate_file(ao_model, mask, tmp_path / "o.nii.gz")
    msg = str(e.value)
    assert "nolabels.nii.gz" in msg and "[3]" in msg and "820" in msg and "Ao" in msg
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 4, 2)])
def test_mask_wrong_dimensionality(ao_model, tmp_path, shape):
    mask = _mask(tmp_path / f"mask{len(shape)}d.nii.gz", np.full(shape, 820, np.uint16))
    with pytest.raises(InputError, match=rf"mask{len(shape)}d.nii.gz.*3-D"):
        inference.generate_file(ao_model, mask, tmp_path / "o.nii.gz")


def test_mask_non_integer_float_labels(ao_model, tmp_path):
    data = _blob(dtype=np.float32)
    data[0, 0, 0] = 0.5
    mask = _mask(tmp_path / "float.nii.gz", data)
    with pytest.raises(InputError, match="float.nii.gz.*non-integer"):
        inference.generate_file(ao_model, mask, tmp_path / "o.nii.gz")
    ok = _mask(tmp_path / "intfloat.nii.gz", _blob(dtype=np.float32))     # integral floats are fine
    inference.generate_file(ao_model, ok, tmp_path / "o.nii.gz")


def test_unknown_values_become_background(ao_model, tmp_path, caplog):
    data = _blob()
    data[15:18, 15:18, :] = 77
    mask = _mask(tmp_path / "m.nii.gz", data)
    with caplog.at_level(logging.WARNING, logger="ctsynth.synth.generate"):
        stats = inference.generate_file(ao_model, mask, tmp_path / "o.nii.gz")
    assert stats["unknown_values"] == [77] and "77" in caplog.text


def test_structures_must_be_model_subset(ao_model, tmp_path):
    mask = _mask(tmp_path / "m.nii.gz", _blob())
    with pytest.raises(ConfigError, match="LV"):
        inference.generate_file(ao_model, mask, tmp_path / "o.nii.gz", structures=["LV"])
    with pytest.raises(ConfigError, match="names none of the selected structures"):
        inference.generate_file(ao_model, mask, tmp_path / "o.nii.gz", structures=["PA"], label_map={820: "Ao"})
    with pytest.raises(ConfigError, match="unknown structure"):
        inference.generate_file(ao_model, mask, tmp_path / "o.nii.gz", structures="Aorta")


def test_parse_label_map_arg(tmp_path):
    assert masks.parse_label_map_arg('{"1": "LV", "2": "PA"}') == {1: "LV", 2: "PA"}
    assert masks.parse_label_map_arg({3: "Ao"}) == {3: "Ao"}
    assert masks.parse_label_map_arg(None) is None
    assert masks.parse_label_map_arg("totalsegmentator-heartchambers")[6] == "Ao"
    assert masks.parse_label_map_arg("mmwhs")[820] == "Ao"
    (tmp_path / "m.json").write_text('{"5": "RA"}')
    (tmp_path / "m.yaml").write_text("7: Myo\n8: WH_is_not_a_label\n")
    (tmp_path / "ok.yml").write_text("7: Myo\n")
    assert masks.parse_label_map_arg(str(tmp_path / "m.json")) == {5: "RA"}
    assert masks.parse_label_map_arg(str(tmp_path / "ok.yml")) == {7: "Myo"}
    with pytest.raises(ConfigError, match="not a structure"):
        masks.parse_label_map_arg(str(tmp_path / "m.yaml"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        masks.parse_label_map_arg('{"1": LV}')
    with pytest.raises(ConfigError, match="neither a preset .*inline JSON nor an existing file"):
        masks.parse_label_map_arg(str(tmp_path / "missing.json"))
    (tmp_path / "evil.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):
        masks.parse_label_map_arg(str(tmp_path / "evil.yaml"))


def test_a_totalsegmentator_labelled_dataset_trains_and_generates_with_only_its_preset_set(tmp_path):
    """Heart labels as TotalSegmentator's heartchambers_highres writes them (1 Myo ... 7 PA): with only
    ``data.label_map: totalsegmentator-heartchambers`` set, ingest -> preprocess -> split -> train ->
    generate run, and ``ctsynth generate`` draws a CT from such a mask with the model's own label map."""
    from ctsynth.core.labels import LABEL_PRESETS
    from ctsynth.data import phantom

    raw = tmp_path / "raw"
    phantom.write_dataset(raw, cases=4, seed=5, shape=(48, 48, 16), spacing=(6.0, 6.0, 8.0), progress=False)
    to_ts = {mmwhs: ts for ts, name in LABEL_PRESETS["totalsegmentator-heartchambers"].items()
             for mmwhs, n in MMWHS_LABEL_MAP.items() if n == name}
    for path in raw.glob("*_label.nii.gz"):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.vectorize(lambda v: to_ts.get(int(v), 0))(data).astype(np.uint8), img.affine),
                 path)
    p = train_on_raw(raw, tmp_path, data={"label_map": "totalsegmentator-heartchambers"})
    stats = gen.run(p, tmp_path / "generator.pt", tmp_path / "processed", tmp_path / "split.json",
                    tmp_path / "interim", tmp_path / "generated")
    assert stats["slices"] > 0
    mask = raw / "ct_train_1001_label.nii.gz"
    out = inference.generate_file(tmp_path / "generator.pt", mask, tmp_path / "ct.nii.gz")   # the model's label map
    assert out["used"] == {v: n for v, n in LABEL_PRESETS["totalsegmentator-heartchambers"].items()
                           if v in out["values_found"]}
    assert nib.load(tmp_path / "ct.nii.gz").shape == nib.load(mask).shape


def test_store_and_model_mismatches_are_listed_together():
    """Every setting that differs is named at once; a setting the model file lacks reads None (only
    ``partial_volume`` has a default when absent: 1, as a store of classes omits it)."""
    from types import SimpleNamespace
    store = SimpleNamespace(meta={"image_size": 64, "hu_window": [-1000, 1000], "structures": ["LV"]})
    gen._check_store_matches_model(store, {"image_size": 64, "hu_window": [-1000.0, 1000.0],
                                           "structures": ["LV"], "partial_volume": 1}, "g.pt")
    with pytest.raises(ModelFileError) as err:
        gen._check_store_matches_model(store, {"hu_window": [-500, 500], "structures": ["LV"],
                                               "partial_volume": 2}, "g.pt")
    text = str(err.value)
    assert "image_size=None but the processed store has image_size=64" in text
    assert "hu_window=[-500.0, 500.0]" in text and "partial_volume=2" in text and "structures" not in text
