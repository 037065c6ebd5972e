"""Procedural thoracic cardiac CT phantom in the MM-WHS file layout (the embedded default dataset).

Each case is a contrast-enhanced chest CT volume with its label map:

* chest wall: superellipse body outline, subcutaneous fat, muscle (pectorals), ribs, sternum;
* spine: vertebral body (cortical rim, cancellous core, discs), canal, posterior elements,
  paraspinal muscles; trachea/bronchi, oesophagus, liver and spleen domes at the bottom;
* lungs with a dependent density gradient, parenchymal texture and vessel-like blobs;
* heart: LV, RV, LA, RA as ellipsoids in a tilted heart frame (long axis pointing
  anterior-left-inferior), LV myocardium, thin unlabelled walls and pericardial fat;
* vessels: aorta (root, ascending, arch, descending beside the spine), pulmonary trunk with
  left/right branches, superior vena cava (unlabelled);
* contrast: left-heart blood (LV, LA, Ao) brighter than right-heart blood (RV, RA, PA), with a
  per-case contrast level; partial-volume blur and slightly correlated scanner noise.

Geometry is defined in millimetres in patient coordinates (x left, y anterior, z superior), the
grid covering
``shape * spacing`` mm centred on the chest (z = 0 near the heart base): a smaller ``shape`` at
the same spacing is a crop, a larger spacing shows the whole chest on fewer voxels. Files carry
an LPS-style affine ``diag(-sx, -sy, sz)`` as DICOM-derived NIfTI do, so ingest's canonical
reorientation is exercised. Labels hold raw MM-WHS values (``labels.MMWHS_LABEL_MAP``); a third file
per case, ``<case>_anatomy.nii.gz``, holds the true body / lung / bone classes (the ``ctsynth``
anatomy preset): what ``data.anatomy.source: supplied`` reads, and the known answer of the
derived rules.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from ctsynth.core.config import Params
from ctsynth.core.errors import ConfigError
from ctsynth.core.io import atomic_dir, save_nifti
from ctsynth.core.labels import BODY, BONE, LUNG, MMWHS_LABEL_MAP
from ctsynth.core.progress import quiet

log = logging.getLogger(__name__)

LABEL = {name: value for value, name in MMWHS_LABEL_MAP.items()}  # "LV" -> 500, ...
HU_RANGE = (-1024, 3071)


def phantom_affine(shape, spacing) -> np.ndarray:
    """Voxel -> world (RAS mm) affine: i runs to patient right, j posterior, k superior (LPS
    storage, like DICOM-derived NIfTI); the volume centre sits at the world origin."""
    aff = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
    return aff


class _Grid:
    """Patient coordinates (mm) of a diagonal-affine grid, one 1-D vector per axis:
    x toward patient left (= -RAS x), y anterior, z superior."""

    def __init__(self, shape, affine):
        self.shape = tuple(shape)
        self.axes = [(sign * (affine[k, k] * np.arange(n) + affine[k, 3])).astype(np.float32)
                     for k, (n, sign) in enumerate(zip(shape, (-1, 1, 1)))]

    def box(self, center, half):
        """Slices of the voxels within ``center +- half`` mm on every axis, or None if empty."""
        out = []
        for ax, c, h in zip(self.axes, center, half):
            idx = np.flatnonzero(np.abs(ax - c) <= h)
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(out)

    def coords(self, sl=(slice(None),) * 3):
        """Broadcastable coordinates of a box: (nx,1,1), (1,ny,1), (1,1,nz)."""
        x, y, z = (ax[s] for ax, s in zip(self.axes, sl))
        return x[:, None, None], y[None, :, None], z[None, None, :]


def _ellipsoid(g: _Grid, center, radii, axes=None, grow: float = 0.0) -> np.ndarray:
    """Boolean (nx,ny,nz) ellipsoid; ``axes`` columns are its unit axes (default: x, y, z), ``grow`` adds mm."""
    axes = np.eye(3) if axes is None else np.asarray(axes, float)
    radii, center = np.asarray(radii, float) + grow, np.asarray(center)
    mask = np.zeros(g.shape, bool)
    sl = g.box(center, np.sqrt(((axes * radii) ** 2).sum(1)))
    if sl is not None:
        d = [c - c0 for c, c0 in zip(g.coords(sl), center)]
        s = sum(((d[0] * axes[0, k] + d[1] * axes[1, k] + d[2] * axes[2, k]) / radii[k]) ** 2
                for k in range(3))
        mask[sl] = s <= 1
    return mask


def _tube(g: _Grid, ctrl, radius, margin: float = 0.0, step: float = 1.0) -> np.ndarray:
    """Distance (mm, float32 (nx,ny,nz)) to the wall of a smooth tube through control points
    ``ctrl`` (N,3) with per-point ``radius``; negative inside, +inf beyond ``margin``."""
    ctrl = np.asarray(ctrl, float)
    t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))])
    s = np.arange(0.0, t[-1] + step, step)
    pts = np.stack([np.interp(s, t, ctrl[:, k]) for k in range(3)], 1)  # (M,3) polyline
    pts = gaussian_filter1d(pts, 8.0 / step, axis=0, mode="nearest")    # round the corners
    rad = np.interp(s, t, np.broadcast_to(np.asarray(radius, float), t.shape))
    dist = np.full(g.shape, np.inf, np.float32)
    for p, r in zip(pts, rad):  # loop over centreline samples (~1/mm), each on a small box
        sl = g.box(p, np.full(3, r + margin))
        if sl is not None:
            x, y, z = g.coords(sl)
            d = np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) - r
            np.minimum(dist[sl], d, out=dist[sl])
    return dist


def _rot(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix (radians) about z, then y, then x."""
    cz, sz, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    cx, sx = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _check(shape, spacing) -> tuple[tuple[int, ...], tuple[float, ...]]:
    shape, spacing = tuple(shape), tuple(spacing)
    if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in shape):
        raise ConfigError(f"phantom.shape: must be three positive integers, got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise ConfigError(f"phantom.spacing: must be three positive numbers (mm), got {spacing}")
    return tuple(int(v) for v in shape), tuple(float(v) for v in spacing)


class _Case:
    """One case being painted: its grid and random draws, the HU, label and anatomy volumes
    (nx, ny, nz), and what every section shares: the coordinates (mm) and the painting rule."""

    def __init__(self, rng: np.random.Generator, shape, spacing):
        self.rng, self.shape, self.spacing = rng, shape, spacing
        self.g = _Grid(shape, phantom_affine(shape, spacing))
        self.x, self.y, self.z = self.g.coords()                # (nx,1,1), (1,ny,1), (1,1,nz) mm
        self.zmin, self.zmax = float(self.g.axes[2].min()), float(self.g.axes[2].max())
        self.U, self.N = rng.uniform, rng.normal
        self.hu = np.full(shape, -1000.0, np.float32)          # (nx,ny,nz) air
        self.lab = np.zeros(shape, np.uint16)                  # (nx,ny,nz) MM-WHS values
        self.anat = np.zeros(shape, np.uint8)                  # (nx,ny,nz) what each voxel was last painted as

    def field(self, sigma_mm: float) -> np.ndarray:
        """Smooth unit-variance random field (nx,ny,nz) for tissue texture."""
        f = gaussian_filter(self.rng.standard_normal(self.shape, dtype=np.float32),
                            [sigma_mm / s for s in self.spacing], mode="nearest")
        return f / max(float(f.std()), 1e-6)

    def paint(self, mask, value, label=None, tissue=BODY) -> None:
        """Later paint wins: HU ``value``, anatomy class ``tissue`` and (if given) ``label`` on ``mask``."""
        mask = np.broadcast_to(mask, self.shape)
        self.hu[mask] = np.broadcast_to(value, self.shape)[mask] if isinstance(value, np.ndarray) else value
        self.anat[mask] = np.broadcast_to(tissue, self.shape)[mask] if isinstance(tissue, np.ndarray) else tissue
        if label is not None:
            self.lab[mask] = label


def make_case(rng: np.random.Generator, shape=(128, 128, 40),
              spacing=(2.6, 2.6, 4.0), modality: str = "ct") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image int16 HU, label uint16 with raw MM-WHS values 0/205/420/500/550/600/820/850,
    anatomy uint8: the true class of every voxel, 0 outside / 1 body / 2 lung and airways / 3 bone,
    as :mod:`ctsynth.data.anatomy` defines them), all of ``shape`` (x, y, z) on the grid of
    :func:`phantom_affine`. ``modality`` "mr": the same anatomy as a bright-blood (bSSFP-like) MR
    image instead (:func:`_as_mr`), int16 arbitrary units >= 0. The sections paint in this order and
    draw from ``rng`` in this order (the same seed gives the same case)."""
    shape, spacing = _check(shape, spacing)
    c = _Case(rng, shape, spacing)
    t = _tissues(c)
    wall = _chest_wall(c, t)
    spine = _spine(c, t, wall)
    heart = _heart_frame(c, wall)
    tubes = _tubes(c, wall, spine, heart)
    _mediastinum_and_lungs(c, t, wall, spine, heart, tubes)
    _heart(c, t, heart, tubes)
    if modality == "mr":
        return _as_mr(c.hu, c.anat, c.lab, c.field, rng), c.lab, c.anat
    # -- scanner: partial-volume blur, then slightly correlated noise
    hu = gaussian_filter(c.hu, (0.7, 0.7, 0.5))
    noise = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.6)
    hu += noise * (c.U(15, 25) / max(float(noise.std()), 1e-6))
    return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16), c.lab, c.anat


def _tissues(c: _Case) -> SimpleNamespace:
    """Per-case tissue values (HU), contrast phase and the two texture fields."""
    U = c.U
    t = SimpleNamespace()
    t.fat, t.mus, t.myo = U(-115, -85), U(35, 55), U(60, 110)
    t.lung, t.bone, t.liver = U(-880, -820), U(450, 650), U(60, 100)
    t.left = U(300, 500)                                      # LV / LA / aorta
    t.right = max(160.0, t.left - U(50, 180))                 # RV / RA / pulmonary artery
    t.lo, t.tex = c.field(12.0), c.field(3.0)                 # low-frequency / fine texture
    return t


def _chest_wall(c: _Case, t: SimpleNamespace) -> SimpleNamespace:
    """Body outline and chest wall (polar depth from a superellipse skin surface): fat, muscle,
    sloping ribs, sternum. Returns the outline's geometry and the cavity inside the rib cage."""
    U, N, x, y, z = c.U, c.N, c.x, c.y, c.z
    w = SimpleNamespace()
    w.a = U(135, 155)
    w.b = w.a * U(0.68, 0.78)
    w.bx, w.by = N(0, 4, 2)
    pw = U(2.2, 2.8)
    X, Y = x - w.bx, y - w.by
    w.Y = Y
    r, th = np.hypot(X, Y), np.arctan2(Y, X)                  # (nx,ny,1)
    widen = 1 + 0.05 * z / 80                                 # (1,1,nz) wider toward the shoulders
    w.depth = widen / (np.abs(np.cos(th) / w.a) ** pw + np.abs(np.sin(th) / w.b) ** pw) ** (1 / pw) - r
    fat_t = U(8, 20) * (1 + 0.3 * np.cos(2 * th + U(0, 6.3)) + 0.2 * np.cos(th + U(0, 6.3)))
    pect = U(6, 16) * np.clip(np.sin(th), 0, None) * np.abs(np.sin(2 * th))
    wall = fat_t + U(6, 10) + pect                            # (nx,ny,1) skin -> rib band, mm
    w.cavity = w.depth > wall + 9                             # (nx,ny,nz) inside the rib cage
    c.paint(w.depth > 0, t.fat + 8 * t.tex)
    c.paint(w.depth > fat_t, t.mus + 6 * t.tex)
    band = (w.depth > wall + 1.5) & (w.depth < wall + 8.5)
    ribs = band & (np.sin(12 * th + z * 2 * np.pi / U(25, 35) + U(0, 6.3)) > 0.45)  # sloping ribs
    ribs &= ~((Y > 0) & (np.abs(X) < 25))                    # costal cartilage gap beside the sternum
    c.paint(ribs, t.bone + 60 * t.tex, tissue=BONE)
    c.paint(band & (Y > 0) & (np.abs(X) < 14), U(250, 400) + 40 * t.tex, tissue=BONE)  # sternum
    return w


def _spine(c: _Case, t: SimpleNamespace, w: SimpleNamespace) -> SimpleNamespace:
    """Spine and paraspinal muscles: vertebral body (discs, cortical rim), arch, spinous and
    transverse processes, canal."""
    U, N, x, y, z, shape = c.U, c.N, c.x, c.y, c.z, c.shape
    s = SimpleNamespace()
    s.sx, s.sy, s.rv = w.bx + N(0, 2), w.by - w.b + U(40, 46), U(15, 19)
    sx, sy, rv = s.sx, s.sy, s.rv
    rs = np.hypot(x - sx, y - sy)                             # (nx,ny,1)
    cy_canal = sy - rv - 9
    rc = np.hypot(x - sx, y - cy_canal)
    paraspinal = ((x - sx) / 48) ** 2 + ((y - cy_canal + 10) / 30) ** 2 < 1
    s.zone = np.broadcast_to(paraspinal | (rs < rv + 6), shape)
    c.paint(s.zone & (w.depth > 0), t.mus + 6 * t.tex)
    disc = ((z - U(0, 28)) % 28) < 6                          # (1,1,nz) intervertebral discs
    c.paint(np.broadcast_to(rs < rv, shape), np.where(disc, 80.0, U(180, 260)) + 25 * t.tex,
            tissue=np.where(disc, BODY, BONE).astype(np.uint8))
    c.paint(np.broadcast_to((rs < rv) & (rs > rv - 2.5), shape) & ~disc, t.bone + 100, tissue=BONE)
    post = ((rc > 7) & (rc < 12) & (y < sy - rv + 3)) \
        | ((np.abs(x - sx) < 4) & (y < cy_canal) & (y > cy_canal - 32))      # arch, spinous process
    for side in (-1, 1):  # transverse processes, angled posterolaterally
        along = side * (x - sx) * 0.9 - (y - cy_canal - 2) * 0.42
        across = side * (x - sx) * 0.42 + (y - cy_canal - 2) * 0.9
        post = post | ((np.abs(across) < 4.5) & (along > 8) & (along < 32))
    c.paint(np.broadcast_to(post, shape), t.bone + 40 * t.tex, tissue=BONE)
    c.paint(np.broadcast_to(rc <= 7, shape), 15.0)           # spinal canal (CSF)
    return s


def _heart_frame(c: _Case, w: SimpleNamespace) -> SimpleNamespace:
    """The heart's frame (long axis u, base -> apex, anterior-left-inferior; v toward the RV), its
    four chambers as ellipsoids, the LV myocardium and the envelope the mediastinum keeps."""
    U, N, g = c.U, c.N, c.g
    h = SimpleNamespace()
    az, el = np.radians(U(30, 50)), np.radians(U(25, 45))
    u = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), -np.sin(el)])
    v = np.cross([0.0, 0.0, 1.0], u)
    v /= np.linalg.norm(v)
    jit = _rot(*np.radians(N(0, 6, 3)))
    h.H = H = jit @ np.stack([u, v, np.cross(u, v)], 1)      # (3,3) columns = heart axes
    h.C = C = np.array([w.bx + U(12, 24), w.by + w.b - U(85, 95), U(-32, -20)])   # LV centre
    sc = U(0.9, 1.1) * (w.a / 145) ** 0.5
    h.sc = sc

    def at(offset):
        """Patient-frame offset (mm) from the LV centre -> position, jittered with the heart."""
        return C + jit @ (np.asarray(offset, float) * sc)

    def size(radii):
        return np.asarray(radii, float) * sc * U(0.9, 1.1, 3)

    h.at = at
    h.chambers = [  # painting order = priority (later wins); name, center, radii, axes
        ("RA", at((-58, -6, 10)), size((25, 25, 32)), jit),
        ("LA", at((-18, -40, 20)), size((30, 18, 24)), jit),
        ("RV", at((-24, 24, -2)), size((44, 28, 34)), H),
        ("LV", at((0, 0, 0)), size((42, 24, 24)), H),
    ]
    h.lv_c, h.lv_r = h.chambers[3][1], h.chambers[3][2]
    h.myo_out = _ellipsoid(g, h.lv_c + H @ [2 * sc, 0, 0], h.lv_r + np.array([9.0, 10, 10]) * sc, H)
    h.envelope = h.myo_out.copy()
    for _, centre, rad, ax in h.chambers:
        h.envelope |= _ellipsoid(g, centre, rad, ax, grow=6.0)
    return h


def _tubes(c: _Case, w: SimpleNamespace, s: SimpleNamespace, h: SimpleNamespace) -> SimpleNamespace:
    """Great vessels, airways and oesophagus as distance fields to their tube walls (mm)."""
    U, g, at = c.U, c.g, h.at
    sx, sy, rv, bx, a = s.sx, s.sy, s.rv, w.bx, w.a
    v = SimpleNamespace()
    root = at((-26, -10, 30))
    arch_z = U(58, 70)
    dx, dy = sx + U(22, 27), sy + rv + U(0, 4)               # descending aorta beside the spine
    tx, ty = sx - 3, sy + rv + U(24, 30)                     # trachea
    v.ao = _tube(g, [root, root + [-2, 6, 16], (root[0] + 1, root[1] + 9, arch_z - 16),
                     (root[0] + 10, root[1] + 5, arch_z - 4), (tx + 20, ty + 12, arch_z),
                     (dx + 1, dy + 14, arch_z - 4), (dx, dy + 3, arch_z - 16), (dx, dy, arch_z - 32),
                     (dx, dy, c.zmin - 40)],
                 U(0.9, 1.1) * np.array([13, 14.5, 14, 13, 12.5, 12, 11.5, 11, 10.5]), 8)
    top = c.zmax + 40                                         # vessels/airways leave through the top
    v.branches = np.minimum.reduce([                          # supra-aortic arteries (unlabelled)
        _tube(g, [(root[0] + 8, root[1] + 5, arch_z), (root[0] - 4, root[1] + 6, top)], 6.5, 5),
        _tube(g, [(tx + 20, ty + 12, arch_z + 4), (tx + 20, ty + 16, top)], 4.5, 5),
        _tube(g, [(dx, dy + 14, arch_z), (dx + 12, dy + 12, top)], 5.5, 5)])
    pa0 = at((-2, 24, 34))
    bif = pa0 + [U(3, 8), -U(24, 32), U(16, 22)]
    rpa = U(8, 10) * np.array([1, 1, 0.85, 0.6])             # branches taper toward the hila
    v.pa = np.minimum.reduce([
        _tube(g, [pa0 - [0, -4, 8], pa0, pa0 + [3, -8, 10], bif], U(12, 14), 8),
        _tube(g, [bif, bif + [14, -8, 2], (bx + 0.25 * a, bif[1] - 20, bif[2] - 4),
                  (bx + 0.33 * a, bif[1] - 26, bif[2] - 12)], rpa, 6),
        _tube(g, [bif, bif + [-10, -10, -2], (bx - 0.22 * a, bif[1] - 14, bif[2] - 4),
                  (bx - 0.32 * a, bif[1] - 14, bif[2] - 10)], rpa, 6)])
    ra_c = h.chambers[0][1]
    v.svc = _tube(g, [(root[0] - U(26, 32), root[1] + 4, top),
                      (ra_c[0] - 4, ra_c[1] - 2, ra_c[2] + 25), ra_c], U(8, 10), 6)
    carina = bif[2] - U(0, 6)
    v.air = np.minimum.reduce([
        _tube(g, [(tx, ty, top), (tx, ty, carina)], U(8, 10), 3),
        _tube(g, [(tx, ty, carina + 5), (tx + 35, ty - 5, carina - 25)], 6.5, 3),
        _tube(g, [(tx, ty, carina + 5), (tx - 30, ty - 2, carina - 15)], 7, 3)])
    v.oes = _tube(g, [(sx + U(2, 8), sy + rv + U(6, 10), top), (sx + 8, sy + rv + 8, c.zmin - 40)], 7, 4)
    return v


def _mediastinum_and_lungs(c: _Case, t: SimpleNamespace, w: SimpleNamespace, s: SimpleNamespace,
                           h: SimpleNamespace, v: SimpleNamespace) -> None:
    """Mediastinal fat, lungs (dependent gradient, texture, vessel-like curves), the abdominal
    domes below the diaphragm, oesophagus and airways."""
    U, g, x, y, z = c.U, c.g, c.x, c.y, c.z
    a, b, bx, by, Y, C = w.a, w.b, w.bx, w.by, w.Y, h.C
    sx, sy, rv = s.sx, s.sy, s.rv
    liver = _ellipsoid(g, (bx - 0.3 * a, by + 0.05 * b, C[2] - U(15, 30) - 70), (0.65 * a, 0.8 * b, 70))
    spleen = _ellipsoid(g, (bx + 0.35 * a, by, C[2] - U(40, 55) - 70), (0.55 * a, 0.75 * b, 70))
    half = 10 + 0.12 * np.clip(0.7 * b - Y, 0, None) + 3 * t.lo  # superior: wider posteriorly
    column = ((np.abs(x - sx - 3) < half) & (y > sy) & (z > C[2] + 25 * h.sc)) \
        | (((x - sx - 12) / 30) ** 2 + ((y - sy - rv - 12) / 18) ** 2 < 1)  # posterior
    medi = h.envelope | column | (v.ao < 8) | (v.branches < 5) | (v.pa < 6) | (v.svc < 6) | (v.air < 3) \
        | (v.oes < 4)
    lung = w.cavity & ~medi & ~s.zone & ~liver & ~spleen
    c.paint(w.cavity & ~s.zone, t.fat + 10 * t.lo)            # mediastinal fat as the default filling
    f1, f2 = c.field(8.0), c.field(8.0)                       # vessels: curves where both fields ~ 0
    hilum = np.exp(-np.hypot(x - C[0] + 20, y - C[1] + 25) / 60)       # (nx,ny,1)
    vness = 1 - np.maximum(np.abs(f1), np.abs(f2)) / (0.12 + 0.16 * hilum)   # > 0 inside a vessel
    lung_val = t.lung + 40 * np.clip(-Y / b, -1, 1) + 15 * t.lo + 12 * t.tex
    lung_val = np.where(vness > 0, -250 + 500 * np.clip(vness, 0, 0.6), lung_val)
    c.paint(lung, lung_val, tissue=LUNG)
    c.paint(w.cavity & liver, t.liver + 8 * t.lo)
    c.paint(w.cavity & spleen & ~liver, t.liver + 15 + 8 * t.lo)
    c.paint(v.oes <= 0, t.mus + 6 * t.tex)
    c.paint(v.oes <= -5.5, -900.0, tissue=LUNG)               # a little air in the lumen
    c.paint(v.air <= 2, t.mus - 10)
    c.paint(v.air <= 0, -1000.0, tissue=LUNG)


def _heart(c: _Case, t: SimpleNamespace, h: SimpleNamespace, v: SimpleNamespace) -> None:
    """Unlabelled thin walls, then the labelled blood pools, myocardium and great vessels."""
    U, g, z = c.U, c.g, c.z
    for _, centre, rad, ax in h.chambers[:3]:
        c.paint(_ellipsoid(g, centre, rad, ax, grow=3.0), t.mus + 5 * t.tex)
    blood = {"LV": t.left, "LA": t.left - U(0, 25), "Ao": t.left + U(-30, 10), "RV": t.right,
             "RA": t.right + U(-30, 30), "PA": t.right + U(-20, 20)}
    for name, centre, rad, ax in h.chambers[:3]:
        vary = 10 if name == "LA" else 30                     # right-heart inflow mixing
        c.paint(_ellipsoid(g, centre, rad, ax), blood[name] + vary * t.lo, LABEL[name])
    c.paint(h.myo_out, t.myo + 6 * t.lo + 5 * t.tex, LABEL["Myo"])
    c.paint(_ellipsoid(g, h.lv_c, h.lv_r, h.H), blood["LV"] + 10 * t.lo, LABEL["LV"])
    c.paint((v.svc <= 0) & ~(c.lab > 0), t.right + U(100, 500) + 30 * t.lo)
    c.paint((v.branches <= 0) & ~(c.lab > 0), blood["Ao"] + 10 * t.lo)
    c.paint(v.pa <= 0, blood["PA"] + 15 * t.lo, LABEL["PA"])
    c.paint(v.ao <= 0, blood["Ao"] - 20 * np.clip(-z / 80, 0, 1) + 10 * t.lo, LABEL["Ao"])


def _as_mr(hu: np.ndarray, anat: np.ndarray, lab: np.ndarray, field, rng: np.random.Generator) -> np.ndarray:
    """The painted anatomy as a bright-blood (balanced SSFP-like) cardiac MR image: blood bright, fat
    bright, myocardium and muscle dark grey, lungs and air dark, cortical bone dark and marrow grey;
    then partial-volume blur, a smooth multiplicative bias field (coil sensitivity) and Rician
    noise (magnitude of complex Gaussian noise). Returns int16 arbitrary units >= 0."""
    U = rng.uniform
    sig = np.full(hu.shape, U(0.26, 0.34), np.float32)                  # muscle, liver, other soft tissue
    body = anat > 0
    sig[body & (hu < -40)] = U(0.70, 0.80)                              # fat
    sig[body & (hu > 150) & (lab == 0)] = U(0.75, 0.85)                 # unlabelled vessels: bright blood
    for value, name in MMWHS_LABEL_MAP.items():                          # labelled blood pools, myocardium
        sig[lab == value] = U(0.18, 0.24) if name == "Myo" else U(0.82, 0.95)
    sig[anat == LUNG] = np.where(hu[anat == LUNG] > -500, U(0.45, 0.6), U(0.03, 0.05))   # lung vessels / air
    bone = anat == BONE
    sig[bone] = np.where(hu[bone] < 350, U(0.4, 0.5), U(0.06, 0.1))      # marrow / cortex
    sig[anat == 0] = 0.0                                                 # air outside
    sig = gaussian_filter(sig, (0.7, 0.7, 0.5)) * (1 + 0.04 * field(3.0))
    sig *= np.exp(U(0.15, 0.3) * field(80.0))                            # coil bias field
    sigma = U(0.015, 0.025)
    real = sig + sigma * rng.standard_normal(hu.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(hu.shape, dtype=np.float32)
    return np.clip(np.rint(2000 * np.hypot(real, imag)), 0, 32767).astype(np.int16)


def _show_progress(progress: bool) -> bool:
    return progress and not quiet()


def run(params: Params, out_dir) -> list[str]:
    """The phantom stage: the ``phantom`` section's data set in ``out_dir`` (when
    ``data.source`` is not ``phantom``, a placeholder note, so the stage's output exists)."""
    if params.data.source != "phantom":
        with atomic_dir(out_dir) as tmp:
            (tmp / "NOT_USED.txt").write_text("data.source is not 'phantom'; ingest reads data.raw_dir\n")
        return []
    ph = params.phantom
    return write_dataset(out_dir, cases=ph.cases, seed=params.seed, shape=tuple(ph.shape), spacing=tuple(ph.spacing),
                         modality=params.data.modality)


def write_dataset(out_dir, cases: int | None = None, seed: int | None = None, shape=None, spacing=None,
                  progress: bool = True, *, modality: str = "ct") -> list[str]:
    """Write ``ct_train_1001_image.nii.gz`` / ``_label.nii.gz`` / ``_anatomy.nii.gz`` ... into ``out_dir``
    and return the case ids; unset arguments take params.yaml's defaults. The folder is built
    aside and swapped in whole (a killed run leaves the previous folder intact). Case ``i`` draws
    from ``np.random.default_rng([seed, i])``; the same seed gives byte-identical files (nibabel
    writes gzip with mtime 0, no file name)."""
    from tqdm import tqdm

    default = Params()
    cases = default.phantom.cases if cases is None else cases
    seed = default.seed if seed is None else seed
    shape = default.phantom.shape if shape is None else shape
    spacing = default.phantom.spacing if spacing is None else spacing

    shape, spacing = _check(shape, spacing)
    if not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ConfigError(f"phantom.cases: must be a positive integer, got {cases!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    affine = phantom_affine(shape, spacing)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    if modality not in ("ct", "mr"):
        raise ConfigError(f"modality: {modality!r}; expected ct or mr")
    ids = [f"{modality}_train_{1001 + i}" for i in range(cases)]          # MM-WHS names: ct_train_1001, mr_train_1001
    with atomic_dir(out_dir) as tmp:
        bar = tqdm(ids, desc="phantom", unit="case", disable=not _show_progress(progress))
        for i, case in enumerate(bar):
            image, label, anatomy = make_case(np.random.default_rng([seed, i]), shape, spacing, modality)
            save_nifti(Path(tmp) / f"{case}_image.nii.gz", image, affine, np.int16, header)
            save_nifti(Path(tmp) / f"{case}_label.nii.gz", label, affine, np.uint16, header)
            save_nifti(Path(tmp) / f"{case}_anatomy.nii.gz", anatomy, affine, np.uint8, header)
    log.info("wrote %d phantom cases %s to %s", cases, "x".join(map(str, shape)), out_dir)
    return ids
