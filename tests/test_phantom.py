"""Tests for the procedural thoracic CT phantom (ctsynth.data.phantom)."""
from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_fill_holes

from ctsynth.core.errors import ConfigError
from ctsynth.core.labels import MMWHS_LABEL_MAP
from ctsynth.data import phantom

SMALL = (48, 48, 16)
SPACING = (2.6, 2.6, 4.0)
VALUE = {name: value for value, name in MMWHS_LABEL_MAP.items()}


@pytest.fixture(scope="module")
def default_case():
    """One default-size case (128x128x40), shared by the anatomy/HU tests."""
    return phantom.make_case(np.random.default_rng([42, 0]))


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_dataset_layout_and_dtypes(tmp_path):
    out = tmp_path / "ph"
    ids = phantom.write_dataset(out, cases=2, seed=1, shape=SMALL, progress=False)
    assert ids == ["ct_train_1001", "ct_train_1002"]
    assert _files(out) == [f"ct_train_100{i}_{kind}.nii.gz" for i in (1, 2) for kind in ("anatomy", "image", "label")]
    img = nib.load(out / "ct_train_1001_image.nii.gz")
    lab = nib.load(out / "ct_train_1001_label.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint16
    assert img.shape == lab.shape == SMALL
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16 and data.min() >= -1024 and data.max() <= 3071
    values = set(np.unique(np.asanyarray(lab.dataobj)).tolist())
    assert values <= {0, *MMWHS_LABEL_MAP}, values
    assert len(values) > 1  # the small crop still shows some heart


def test_affine_is_anisotropic_lps(tmp_path):
    out = tmp_path / "ph"
    phantom.write_dataset(out, cases=1, seed=3, shape=SMALL, spacing=SPACING, progress=False)
    for kind in ("image", "label"):
        img = nib.load(out / f"ct_train_1001_{kind}.nii.gz")
        assert np.allclose(img.header.get_zooms(), SPACING)
        assert np.allclose(img.affine, img.get_qform()) and np.allclose(img.affine, img.get_sform())
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # not RAS: ingest must reorient
        assert img.header.get_xyzt_units()[0] == "mm"
        assert nib.aff2axcodes(nib.as_closest_canonical(img).affine) == ("R", "A", "S")
    # the volume centre is the world origin
    centre = nib.affines.apply_affine(img.affine, (np.array(SMALL) - 1) / 2)
    assert np.allclose(centre, 0, atol=1e-3)


def test_default_case_has_all_structures(default_case):
    image, label, _ = default_case
    assert image.shape == label.shape == (128, 128, 40)
    assert image.dtype == np.int16 and label.dtype == np.uint16
    present = set(np.unique(label).tolist()) - {0}
    assert present == set(MMWHS_LABEL_MAP), present
    for value, name in MMWHS_LABEL_MAP.items():
        assert (label == value).sum() > 300, name  # each structure is more than a speck


def test_hu_realism(default_case):
    image, label, _ = default_case
    hu = image.astype(np.float32)

    def mean(name):
        return float(hu[label == VALUE[name]].mean())

    # lungs: air-like voxels inside the body outline, unlabelled
    body = np.stack([binary_fill_holes(image[:, :, k] > -500) for k in range(image.shape[2])], -1)
    lung = body & (image < -500) & (label == 0)
    assert lung.sum() > 0.2 * body.sum()                # lungs are a large part of the chest
    assert np.median(hu[lung]) < -750                   # parenchyma about -850 HU
    assert np.median(hu[body & (label == 0) & ~lung]) < 100  # soft tissue/fat, not contrast
    assert np.median(hu[~body]) < -950                  # air outside the patient
    assert mean("LV") > 150 and mean("LA") > 150 and mean("Ao") > 150
    assert mean("LV") > mean("RV") and mean("LA") > mean("RA")
    assert -50 < mean("Myo") < 200
    assert mean("LV") - mean("Myo") > 150               # the wall is visible against the blood
    assert 150 < mean("PA") < 600 and 150 < mean("Ao") < 600   # NOTICE.md: Ao 353, PA 538
    assert 10 < float(hu[label == VALUE["LV"]].std()) < 120      # noisy, not constant


def test_anatomy_is_oriented(default_case):
    """In world (RAS) coordinates: LV left of RA, RV anterior of LA, arch above the heart."""
    _, label, _ = default_case
    affine = phantom.phantom_affine(label.shape, SPACING)

    def world(name):
        return nib.affines.apply_affine(affine, np.argwhere(label == VALUE[name]))

    assert world("LV")[:, 0].mean() < world("RA")[:, 0].mean()    # +x is patient right
    assert world("RV")[:, 1].mean() > world("LA")[:, 1].mean()    # +y is anterior
    assert world("Ao")[:, 2].max() > world("PA")[:, 2].max() > world("LV")[:, 2].max()
    assert world("LV")[:, 2].min() < world("LA")[:, 2].min()      # apex below the atria
    ao_low = world("Ao")[world("Ao")[:, 2] < world("LV")[:, 2].mean()]
    assert len(ao_low) and ao_low[:, 1].mean() < world("LV")[:, 1].min()  # descending aorta behind


def test_deterministic_bytes_and_seed_dependence(tmp_path):
    kw = dict(cases=2, shape=SMALL, progress=False)
    phantom.write_dataset(tmp_path / "a", seed=7, **kw)
    phantom.write_dataset(tmp_path / "b", seed=7, **kw)
    phantom.write_dataset(tmp_path / "c", seed=8, **kw)
    for name in _files(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    name = "ct_train_1001_image.nii.gz"
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    # cases within one dataset differ too
    first = np.asanyarray(nib.load(tmp_path / "a" / "ct_train_1001_label.nii.gz").dataobj)
    second = np.asanyarray(nib.load(tmp_path / "a" / "ct_train_1002_label.nii.gz").dataobj)
    assert not np.array_equal(first, second)


def test_cases_vary_in_size_and_contrast():
    lv_voxels, lv_hu = [], []
    for i in range(3):
        image, label, _ = phantom.make_case(np.random.default_rng([0, i]), (64, 64, 20), (5.2, 5.2, 8.0))
        lv = label == VALUE["LV"]
        lv_voxels.append(int(lv.sum()))
        lv_hu.append(float(image[lv].mean()))
    assert len(set(lv_voxels)) == 3 and min(lv_voxels) > 0
    assert max(lv_hu) - min(lv_hu) > 10


def test_existing_folder_is_replaced_entirely(tmp_path):
    out = tmp_path / "ph"
    out.mkdir()
    (out / "marker.txt").write_text("old")
    phantom.write_dataset(out, cases=1, seed=0, shape=SMALL, progress=False)
    assert _files(out) == ["ct_train_1001_anatomy.nii.gz", "ct_train_1001_image.nii.gz", "ct_train_1001_label.nii.gz"]
    assert _files(tmp_path) == ["ph"]  # no temporary folders left behind


def test_failure_midway_leaves_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "ph"
    out.mkdir()
    (out / "marker.txt").write_text("old")
    real = phantom.make_case
    calls = []

    def flaky(rng, shape, spacing, modality="ct"):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-way")
        return real(rng, shape, spacing, modality)

    monkeypatch.setattr(phantom, "make_case", flaky)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        phantom.write_dataset(out, cases=3, seed=0, shape=SMALL, progress=False)
    assert len(calls) == 2
    assert _files(out) == ["marker.txt"] and (out / "marker.txt").read_text() == "old"
    assert _files(tmp_path) == ["ph"]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="cases"):
        phantom.write_dataset(tmp_path / "x", cases=0, progress=False)
    with pytest.raises(ConfigError, match="shape"):
        phantom.make_case(np.random.default_rng(0), shape=(32, 32))
    with pytest.raises(ConfigError, match="spacing"):
        phantom.make_case(np.random.default_rng(0), shape=(32, 32, 8), spacing=(1.0, 0.0, 1.0))
    assert not (tmp_path / "x").exists()


def test_progress_bar_quiet_under_ci(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert phantom._show_progress(True) and not phantom._show_progress(False)
    monkeypatch.setenv("CI", "true")
    assert not phantom._show_progress(True)


def test_stage_entry_point_follows_params(tmp_path):
    """phantom.run writes the phantom section's data set; with another data source it writes
    only a note (the stage's output must exist) and no case."""
    from conftest import tiny_params

    p = tiny_params(phantom={"cases": 3, "shape": list(SMALL)})
    assert phantom.run(p, tmp_path / "a") == ["ct_train_1001", "ct_train_1002", "ct_train_1003"]
    assert len(list((tmp_path / "a").glob("*_image.nii.gz"))) == 3
    p.data.source = "nifti"
    assert phantom.run(p, tmp_path / "b") == []
    assert [f.name for f in (tmp_path / "b").iterdir()] == ["NOT_USED.txt"]
