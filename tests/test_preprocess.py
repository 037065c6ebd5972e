"""preprocess: intensity mapping, orientation, slice selection, resizing, the memmap store."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from corpus import write_case
from ctsynth.core.config import params_from_dict
from ctsynth.core.labels import structure_index
from ctsynth.data import ingest, preprocess
from ctsynth.data.store import ProcessedStore, SliceDataset


def test_hu_roundtrip_and_clipping():
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    x = preprocess.hu_to_unit(hu, [-1000, 1000])
    np.testing.assert_allclose(x, [-1, -1, 0, 0.5, 1, 1])
    np.testing.assert_allclose(preprocess.unit_to_hu(x, [-1000, 1000]), [-1000, -1000, 0, 500, 1000, 1000])


def test_display_orientation_inverse_and_convention():
    a = np.arange(12).reshape(4, 3)          # canonical RAS slice [x, y]
    d = preprocess.to_display(a)
    assert d.shape == (3, 4)
    # RAS+: x runs left->Right, y posterior->Anterior. Radiological view puts the patient's
    # right (high x) on the image left and anterior (high y) on top: D[r, c] = A[X-1-c, Y-1-r].
    assert d[0, 0] == a[3, 2] and d[2, 3] == a[0, 0]
    np.testing.assert_array_equal(preprocess.from_display(d), a)


def test_select_slices_margin():
    label = np.zeros((4, 4, 10), np.uint8)
    label[1, 1, 4] = 3
    assert list(preprocess.select_slices(label, [3], "structures", 2)) == [2, 3, 4, 5, 6]
    assert list(preprocess.select_slices(label, [1], "structures", 2)) == []
    assert len(preprocess.select_slices(label, [1], "all", 0)) == 10


def test_kept_indices_wh_keeps_all():
    assert preprocess.kept_indices(["WH"]) == list(range(1, 8))
    assert preprocess.kept_indices(["LV", "Ao"]) == [3, 6]


def _ingested(tmp_path, **pre):
    raw = tmp_path / "raw"
    write_case(raw, "p1")
    write_case(raw, "p2", seed=1)
    params = params_from_dict({"data": {"source": "nifti", "raw_dir": str(raw)},
                               "preprocess": {"image_size": 16, **pre},
                               "model": {"gen_depth": 4, "disc_layers": 2}})
    ingest.run(params, tmp_path / "interim")
    return params


def test_store_contents(tmp_path):
    params = _ingested(tmp_path, structures=["LV"], margin=1)
    meta = preprocess.run(params, tmp_path / "interim", tmp_path / "processed")
    store = ProcessedStore(tmp_path / "processed")
    # LV occupies z 2..5 of 8 -> with margin 1: z 1..6 = 6 slices per case.
    assert len(store.slices) == 12 and list(store.slices.z[:6]) == [1, 2, 3, 4, 5, 6]
    assert store.images.dtype == np.float16 and store.images.shape == (12, 16, 16)
    assert isinstance(store.images, np.memmap)
    assert set(np.unique(store.masks)) == {0, structure_index("LV")}   # Ao dropped: not selected
    assert store.images.min() >= -1 and store.images.max() <= 1
    assert meta["cases"]["p1"]["z"] == [1, 2, 3, 4, 5, 6]
    assert np.allclose(meta["cases"]["p1"]["orig_affine"], np.diag([-1.5, -1.5, 2.5, 1.0]))
    # LV blob is bright (350 HU -> 0.35) inside the mask, dark (-500 HU) outside.
    lv = store.masks[3] == structure_index("LV")
    assert store.images[3][lv].mean() > 0.2 and store.images[3][~lv].mean() < -0.3
    cond, image = SliceDataset(store, np.arange(12), "onehot")[3]
    assert tuple(cond.shape) == (1, 16, 16) and tuple(image.shape) == (1, 16, 16)


def test_wh_and_all_slices(tmp_path):
    params = _ingested(tmp_path, structures=["WH"], slices="all")
    preprocess.run(params, tmp_path / "interim", tmp_path / "processed")
    store = ProcessedStore(tmp_path / "processed")
    assert len(store.slices) == 16
    assert set(np.unique(store.masks)) == {0, structure_index("LV"), structure_index("Ao")}
    cond, _ = SliceDataset(store, np.arange(16), "onehot")[4]
    assert cond.shape[0] == 1 and cond.max() == 1


def test_deterministic(tmp_path):
    params = _ingested(tmp_path)
    preprocess.run(params, tmp_path / "interim", tmp_path / "a")
    preprocess.run(params, tmp_path / "interim", tmp_path / "b")
    for name in ("images.npy", "masks.npy", "slices.csv", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_restore_slice_roundtrip():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 10, (20, 24)).astype(np.float32) + np.linspace(-500, 500, 24)[None]
    x, _ = preprocess.prepare_slice(hu, np.zeros((20, 24), np.uint8), 24, [-1000, 1000], [1])
    back = preprocess.restore_slice(x, (20, 24), [-1000, 1000])
    assert back.shape == (20, 24)
    assert np.abs(back - hu).mean() < 60      # resize 20->24->20 blurs the noise only


def test_real_scan_fixture(tmp_path, real_raw):
    raw = real_raw
    params = params_from_dict({"data": {"source": "nifti", "raw_dir": str(raw), "label_map": {1: "Ao"}},
                               "preprocess": {"structures": ["Ao"], "image_size": 64, "margin": 0}})
    ingest.run(params, tmp_path / "interim")
    preprocess.run(params, tmp_path / "interim", tmp_path / "processed")
    store = ProcessedStore(tmp_path / "processed")
    label = np.asanyarray(nib.load(str(tmp_path / "interim" / "real_label.nii")).dataobj)
    assert len(store.slices) == int((label.reshape(-1, label.shape[2]).max(0) > 0).sum())
    ao = store.masks == structure_index("Ao")
    hu = preprocess.unit_to_hu(store.images.astype(np.float32), [-1000, 1000])
    assert 150 < np.median(hu[ao]) < 500            # contrast aorta
    assert np.median(hu[~ao]) < 100                  # lung/soft tissue around it
    assert json.loads((tmp_path / "processed" / "meta.json").read_text())["label_map"] == {"1": "Ao"}


def test_missing_manifest(tmp_path):
    from ctsynth.core.errors import InputError

    with pytest.raises(InputError, match="manifest.csv"):
        preprocess.run(params_from_dict({}), tmp_path, tmp_path / "out")
