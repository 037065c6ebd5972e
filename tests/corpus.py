"""A bad-input corpus made on the fly (no committed binaries).

Each ``BAD_INPUTS`` entry writes one broken case into a folder that also holds a good case and
returns ``(file name expected in the message, reason fragment expected in the message)``.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.diag([-1.5, -1.5, 2.5, 1.0])  # LPS-like, anisotropic


def volumes(shape=(24, 24, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like int16 image and an MM-WHS label (LV 500 blob, Ao 820 blob)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(-500, 50, shape).astype(np.int16)
    label = np.zeros(shape, np.uint16)
    x, y = np.mgrid[: shape[0], : shape[1]]
    blob = (x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 < (shape[0] / 5) ** 2
    label[blob, 2 : shape[2] - 2] = 500
    label[2:5, 2:5, :] = 820
    image[label == 500] = 350
    return image, label


def save(path: Path, data, affine=AFFINE, dtype=None) -> Path:
    img = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data).astype(dtype), affine)
    nib.save(img, str(path))
    return path


def write_case(folder: Path, case: str, image=None, label=None, affine=AFFINE, label_affine=None,
               seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    img, lab = volumes(seed=seed)
    image = img if image is None else image
    label = lab if label is None else label
    ip = save(folder / f"{case}_image.nii.gz", image, affine)
    lp = save(folder / f"{case}_label.nii.gz", label, affine if label_affine is None else label_affine)
    return ip, lp


def _corrupt_gzip(d: Path):
    ip, _ = write_case(d, "bad")
    raw = bytearray(ip.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = os.urandom(64)
    ip.write_bytes(bytes(raw))
    return ip.name, "gzip"


def _truncated(d: Path):
    ip, _ = write_case(d, "bad")
    data = gzip.decompress(ip.read_bytes())
    ip.write_bytes(gzip.compress(data[: len(data) // 2]))
    return ip.name, "NIfTI"


def _zero_bytes(d: Path):
    ip, _ = write_case(d, "bad")
    ip.write_bytes(b"")
    return ip.name, "empty file"


def _image_2d(d: Path):
    img, lab = volumes()
    ip, _ = write_case(d, "bad", image=img[:, :, 0], label=lab[:, :, 0])
    return ip.name, "3-D"


def _image_4d(d: Path):
    img, lab = volumes()
    ip, _ = write_case(d, "bad", image=np.stack([img, img], -1))
    return ip.name, "3-D"


def _shape_mismatch_no_affine(d: Path):
    img, lab = volumes()
    ip, lp = write_case(d, "bad", label=lab[:20])
    nii = nib.load(str(lp))
    nii.header.set_sform(None, code=0)
    nii.header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asanyarray(nii.dataobj), None, nii.header), str(lp))
    return lp.name, "no usable affine"


def _non_overlapping(d: Path):
    shifted = AFFINE.copy()
    shifted[:3, 3] = [500.0, 500.0, 500.0]
    _, lp = write_case(d, "bad", label_affine=shifted)
    return lp.name, "does not overlap"


def _nan_affine(d: Path):
    bad = AFFINE.copy()
    bad[0, 3] = np.nan
    ip, _ = write_case(d, "bad", affine=bad)
    return ip.name, "NaN"


def _singular_affine(d: Path):
    ip, _ = write_case(d, "bad")
    bad = AFFINE.copy()
    bad[2, 2] = 0.0
    nii = nib.load(str(ip))
    header = nii.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(bad, code=1)   # sform only: a qform cannot even encode a singular matrix
    nib.save(nib.Nifti1Image(np.asanyarray(nii.dataobj), None, header), str(ip))
    return ip.name, "singular"


def _unknown_labels(d: Path):
    img, lab = volumes()
    lab[0, 0, 0] = 999
    _, lp = write_case(d, "bad", label=lab)
    return lp.name, "[999]"


def _empty_label(d: Path):
    img, lab = volumes()
    _, lp = write_case(d, "bad", label=np.zeros_like(lab))
    return lp.name, "empty"


def _float_labels(d: Path):
    img, lab = volumes()
    flab = lab.astype(np.float32)
    flab[lab == 500] = 500.5
    _, lp = write_case(d, "bad", label=flab)
    return lp.name, "non-integer"


def _nan_voxels(d: Path):
    img, lab = volumes()
    fimg = img.astype(np.float32)
    fimg[1, 1, 1] = np.nan
    fimg[2, 2, 2] = np.inf
    ip, _ = write_case(d, "bad", image=fimg)
    return ip.name, "NaN/Inf"


def _constant_image(d: Path):
    img, lab = volumes()
    ip, _ = write_case(d, "bad", image=np.full_like(img, -1000))
    return ip.name, "constant"


def _missing_partner(d: Path):
    _, lp = write_case(d, "bad")
    lp.unlink()
    return "bad_image.nii.gz", "missing partner"


def _duplicate_case(d: Path):
    write_case(d / "sub", "good")
    return "good_image.nii.gz", "duplicate case id"


def _unreadable(d: Path):
    # Permission bits do not stop root (CI runs as root), so the unreadable path is a folder
    # standing where the label file should be.
    _, lp = write_case(d, "bad")
    lp.unlink()
    lp.mkdir()
    return lp.name, "not a regular file"


BAD_INPUTS = {
    "corrupt_gzip": _corrupt_gzip,
    "truncated": _truncated,
    "zero_bytes": _zero_bytes,
    "image_2d": _image_2d,
    "image_4d": _image_4d,
    "shape_mismatch_no_affine": _shape_mismatch_no_affine,
    "non_overlapping": _non_overlapping,
    "nan_affine": _nan_affine,
    "singular_affine": _singular_affine,
    "unknown_labels": _unknown_labels,
    "empty_label": _empty_label,
    "float_labels": _float_labels,
    "nan_voxels": _nan_voxels,
    "constant_image": _constant_image,
    "missing_partner": _missing_partner,
    "duplicate_case": _duplicate_case,
    "unreadable": _unreadable,
}
