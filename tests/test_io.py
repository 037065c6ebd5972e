"""io: atomic writes and NIfTI helpers."""
from __future__ import annotations

import numpy as np
import pytest

from ctsynth.core.errors import InputError
from ctsynth.core.io import (
    atomic_dir,
    atomic_file,
    load_nifti,
    overlap_fraction,
    resample_nearest,
    save_nifti,
    write_json,
)


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir_swaps_whole_folder_and_cleans_stale(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("1")
    (tmp_path / ".d.zzz.tmp").mkdir()                    # debris of a killed run
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("2")
            raise ValueError
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("2")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_save_and_load_nifti_roundtrip(tmp_path):
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    save_nifti(tmp_path / "x.nii.gz", data, affine)
    img = load_nifti(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)
    assert img.get_data_dtype() == np.int16


def test_load_nifti_rejects_non_nifti(tmp_path):
    bad = tmp_path / "x.nii"
    bad.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(InputError, match="x.nii: not a readable NIfTI"):
        load_nifti(bad)


def test_overlap_and_nearest_resampling():
    a = np.diag([1.0, 1.0, 1.0, 1.0])
    assert overlap_fraction((10, 10, 10), a, (10, 10, 10), a) == pytest.approx(1.0)
    far = a.copy()
    far[:3, 3] = 100
    assert overlap_fraction((10, 10, 10), a, (10, 10, 10), far) == 0.0
    src = np.zeros((5, 5, 5), np.uint8)
    src[2, 2, 2] = 7
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    out = resample_nearest(src, a, (10, 10, 10), fine)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 7} and (out == 7).sum() == 8
