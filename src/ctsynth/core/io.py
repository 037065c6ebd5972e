"""File I/O: atomic writes, validated NIfTI reading, orientation and affine-aware resampling.

Every output of every stage goes through :func:`atomic_file` or :func:`atomic_dir`: the data is
written to a temporary sibling and renamed into place only when complete, so a killed stage
leaves the previous output exactly as it was.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from ctsynth.core.errors import InputError


def project_root() -> Path:
    """The user's repository: ``$DVC_ROOT`` (DVC sets it for every stage; under ``dvc exp run
    --queue/--temp`` it names the user's repo, not the temporary copy the stage runs in), else
    the nearest folder above the working directory holding ``.dvc/``, else the working directory.
    Shared working state (the MLflow store, training checkpoints) lives here."""
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    return next((p for p in (cwd, *cwd.parents) if (p / ".dvc").is_dir()), cwd)


# ----------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)          # mkstemp makes 0600; outputs get ordinary permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; swap it in for ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):   # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)          # mkdtemp makes 0700; outputs get ordinary permissions
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def sync_text(path: str | os.PathLike, text: str, write: bool) -> str:
    """A generated file against what it should hold: "current", "rewritten" (``write``: replaced
    atomically with ``text``) or "differs"."""
    if Path(path).read_text() == text:
        return "current"
    if write:
        write_text(path, text)
        return "rewritten"
    return "differs"


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save`` atomically and byte-for-byte repeatably: saving through a file handle names
    the archive's inner folder "archive" (given a path, torch names it after the temporary file)."""
    import torch

    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame atomically (no index column)."""
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


# ----------------------------------------------------------------------------- NIfTI

def _gzip_ok(path: Path) -> str | None:
    """Return a problem description if a .gz file is not a complete gzip stream."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as e:
        return f"corrupt or truncated gzip ({e})"
    return None


def load_nifti(path: str | os.PathLike, role: str = "image") -> nib.Nifti1Image:
    """Load and sanity-check a NIfTI file; raise InputError with every problem found."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    if path.suffix == ".gz":
        problem = _gzip_ok(path)
        if problem:
            raise InputError(f"{path}: {problem}")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for malformed headers / short data
        raise InputError(f"{path}: not a readable NIfTI {role} ({type(e).__name__}: {e})") from None
    problems = []
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        img = nib.Nifti1Image(data, img.affine, img.header)
    if data.ndim != 3:
        problems.append(f"{path}: {role} must be a 3-D volume, got {data.ndim}-D shape {tuple(data.shape)}")
    if min(data.shape, default=0) < 1:
        problems.append(f"{path}: {role} has an empty dimension {tuple(data.shape)}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        problems.append(f"{path}: affine contains NaN/Inf")
    elif abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        problems.append(f"{path}: affine is singular (zero voxel size or degenerate axes)")
    if problems:
        raise InputError(problems)
    return img


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
               dtype=np.int16, header: nib.Nifti1Header | None = None) -> None:
    """Write a NIfTI file atomically with the given affine (qform and sform both set)."""
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine, header)
    img.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = Path(path)
    with atomic_file(path) as tmp:
        # nibabel picks compression from the file name: save under the real suffix, then move.
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        named = tmp.with_name(tmp.name + suffix)
        nib.save(img, str(named))
        os.replace(named, tmp)


def canonical(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Reorient to the closest canonical (RAS+) orientation; voxels are permuted/flipped only."""
    return nib.as_closest_canonical(img)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel array on ``affine``'s grid -> closest canonical RAS+ (the array :func:`canonical` holds)."""
    return nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))


def from_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: canonical RAS+ array -> the orientation of ``affine``."""
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    ornt = nib.orientations.ornt_transform(ras, nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))


def world_bounds(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = nib.affines.apply_affine(affine, corners)
    return world.min(0), world.max(0)


def overlap_fraction(shape_a, affine_a, shape_b, affine_b) -> float:
    """Fraction of A's bounding box (world space) covered by B's."""
    lo_a, hi_a = world_bounds(shape_a, affine_a)
    lo_b, hi_b = world_bounds(shape_b, affine_b)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    vol_a = np.prod(hi_a - lo_a)
    return float(np.prod(inter) / vol_a) if vol_a > 0 else 0.0


def resample_nearest(data: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine) -> np.ndarray:
    """Nearest-neighbour resampling of ``data`` (on src grid) onto the dst grid via the affines."""
    from scipy.ndimage import map_coordinates

    vox2vox = np.linalg.inv(src_affine) @ dst_affine
    out = np.empty(tuple(dst_shape), dtype=data.dtype)
    ii, jj = np.meshgrid(np.arange(dst_shape[0]), np.arange(dst_shape[1]), indexing="ij")
    for k in range(dst_shape[2]):  # slice by slice: memory stays small for big volumes
        coords = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], 0).astype(np.float64)
        src = vox2vox[:3, :3] @ coords + vox2vox[:3, 3:4]
        out[:, :, k] = map_coordinates(data, src, order=0, mode="constant", cval=0).reshape(ii.shape)
    return out
