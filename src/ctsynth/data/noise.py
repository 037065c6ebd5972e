"""The output noise model (``model.noise: nps``): CT noise sampled, not drawn by the generator.

A CT slice is what the anatomy explains plus the scanner's noise, a random field of its own in
every scan. A deterministic mask -> CT map cannot know the noise realisation; trained against a
discriminator it draws a fixed pattern in its place (inside the heart structures the generated
residual was 1.3-1.7x the real one, and 1.7-2.0x in every band of the noise power spectrum:
``docs/realism.md``). With the noise model the generator is to draw the noise-free slice and the noise
is sampled from what was measured on the training slices:

* **Measured** (:func:`measure`, at training, on the training slices only): inside each heart
  structure of each slice, eroded by :data:`ERODE` px so the partial volume of its edges stays out,
  the deviation from that structure's mean on that slice. The power spectra of these fields,
  summed over all regions and divided by their pixel count, estimate the noise power spectrum (NPS,
  per pixel in model units², so its mean is the noise variance; a region's finite size blurs it,
  and removing each region's mean removes the power below ~1 / region size). It is then averaged
  over rings of equal spatial frequency: axial CT noise is close to isotropic.
* **Correlated along z** (measured with the slices' case and z): scanner noise is not independent
  from slice to slice (reconstruction kernels, overlapping slices, a 3-D noise texture). For every
  pair of adjacent training slices, inside each structure present in both (eroded, as above), the
  cross-spectrum of the two deviation fields over their mean power gives the lag-1 correlation per
  ring of equal frequency, ``z_corr`` (1: the same field in both slices; 0: independent).
* **Sampled** (:meth:`NoiseModel.sample`): white Gaussian noise filtered by sqrt(NPS) in the
  Fourier domain, a stationary field with that spectrum; its standard deviation is the measured one.
  Along z (:meth:`NoiseModel.for_keys`, slices keyed ``(*volume, z)``) a first-order autoregression
  per frequency, ``N_z = rho N_{z-1} + sqrt(1 - rho^2) E_z`` with ``E_z`` the slice's own sample: the
  same spectrum in every slice and the measured correlation between neighbours (an AR(1) model of
  the 3-D noise power spectrum: correlation rho^k at lag k).
* **Training** (:func:`ctsynth.train.gan.gan_step`): the discriminator judges the generated slice
  plus a fresh sample (drawn from ``(train.seed, rank, step)``, so a resumed run draws the same); L1
  compares the noise-free output with the real slice, so the generator has no reason left to draw
  texture of its own. Measured, it still does (the residual stayed above the real one, with the
  sample on top) and, with independent samples per slice, flicker rose (docs/experiments/
  generator-realism.md, grid 4); ``model.output_blur`` takes the fine texture out of the generator's
  reach (grid 7).
* **Generation** (:class:`ctsynth.synth.inference.MaskToCT`): output + a sample whose innovation is
  seeded per slice by ``(seed, *key)`` (the key names the case and z; the z chain runs from z 0), so a
  slice's noise does not depend on batching; without a seed the noise-free slice (the conditional
  mean) comes out.

The noise is stationary and additive: a model of CT's signal-independent noise. MR's noise is
Rician (signal-dependent, non-negative), so ``data.modality: mr`` refuses the option.
The model file holds :func:`record` (``{"source", "radial_nps", "std", "size"}``, and ``"z_corr"``
when measured; a model file without it samples every slice independently, as before).
"""
from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
from scipy import ndimage

ERODE = 1                 # px the structures are eroded by before measuring (their edges' partial volume)
MIN_PIXELS = 16           # a region smaller than this after erosion is left out
MODES = ("none", "nps")
MAX_Z_CORR = 0.95         # |rho| cap: a chain of near-identical slices would be a measurement artefact
CHAINS_KEPT = 64          # volumes whose last z-chain state is kept (generation walks z in order)


@functools.lru_cache(maxsize=8)
def ring_index(size: int) -> np.ndarray:
    """(S, S) integer radial frequency bin of each FFT coefficient (0: DC); cached, so read-only.
    The rings of the noise power spectrum here and of the generator's spectral term
    (:func:`ctsynth.train.gan.radial_log_spectrum`)."""
    f = np.fft.fftfreq(size) * size
    rings = np.rint(np.hypot(*np.meshgrid(f, f, indexing="ij"))).astype(np.int64)
    rings.flags.writeable = False
    return rings


def _regions(mask: np.ndarray) -> dict:
    """{structure value: eroded region} of every structure of one slice big enough to measure in."""
    regions = {}
    for value in np.unique(mask[mask > 0]):
        region = ndimage.binary_erosion(mask == value, iterations=ERODE)
        if int(region.sum()) >= MIN_PIXELS:
            regions[value] = region
    return regions


def _deviation(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    return np.where(region, image - image[region].mean(), 0.0)


def _radial(values: np.ndarray, size: int) -> np.ndarray:
    rings = ring_index(size)
    return np.bincount(rings.ravel(), values.ravel()) / np.bincount(rings.ravel())


def measure(images: np.ndarray, masks: np.ndarray, cases=None, zs=None) -> dict:
    """The noise record of real slices ``images`` (N, S, S) in model units with their structure
    index ``masks`` (N, S, S): see the module doc. With each slice's ``cases`` and ``zs`` (N,) the
    record gets ``z_corr`` too, from the pairs of slices adjacent in one case (none adjacent: all
    0). ValueError when no structure is big enough."""
    size = images.shape[-1]
    images, masks = np.asarray(images, np.float64), np.asarray(masks)
    regions = [_regions(mask) for mask in masks]                              # each slice's, once
    power, pixels = np.zeros((size, size)), 0
    for image, own in zip(images, regions):
        for region in own.values():
            power += np.abs(np.fft.fft2(_deviation(image, region))) ** 2
            pixels += int(region.sum())
    if pixels == 0:
        raise ValueError(f"no structure region of >= {MIN_PIXELS} px after a {ERODE}-px erosion to measure the "
                         f"noise in")
    radial = _radial(power / pixels, size)                                     # mean over the rings = variance
    radial[0] = 0.0                                                            # zero-mean noise
    z_corr = None if cases is None or zs is None else _z_correlation(images, regions, cases, zs)
    return record(radial, size, z_corr)


def _z_correlation(images: np.ndarray, regions: list[dict], cases, zs) -> np.ndarray:
    """Lag-1 correlation along z per ring (module doc), from the slices adjacent in their case;
    ``regions``: each slice's :func:`_regions`."""
    size = images.shape[-1]
    keys = list(zip(np.asarray(cases).tolist(), np.asarray(zs, np.int64).tolist()))
    where = {key: i for i, key in enumerate(keys)}
    cross, power = np.zeros((size, size)), np.zeros((size, size))
    for i, (case, z) in enumerate(keys):
        j = where.get((case, z + 1))
        if j is None:
            continue
        for value, region in regions[i].items():
            both = region & regions[j].get(value, False)
            if int(both.sum()) < MIN_PIXELS:
                continue
            a, b = np.fft.fft2(_deviation(images[i], both)), np.fft.fft2(_deviation(images[j], both))
            cross += (a * b.conj()).real
            power += (np.abs(a) ** 2 + np.abs(b) ** 2) / 2
    if not power.any():
        return np.zeros(int(ring_index(size).max()) + 1)
    rho = _radial(cross, size) / np.maximum(_radial(power, size), 1e-30)
    rho[0] = 0.0
    return np.clip(rho, -MAX_Z_CORR, MAX_Z_CORR)


def record(radial: np.ndarray, size: int, z_corr: np.ndarray | None = None) -> dict:
    """The model file's noise record for a radial NPS (per ring, model units² per pixel) and, when
    measured, the lag-1 correlation along z per ring."""
    radial = np.asarray(radial, np.float64)
    std = float(np.sqrt(radial[ring_index(size)].mean()))
    rec = {"source": "nps", "radial_nps": [float(v) for v in radial], "std": std, "size": int(size)}
    if z_corr is not None:
        rec["z_corr"] = [float(v) for v in np.asarray(z_corr, np.float64)]
    return rec


class NoiseModel:
    """Samples of the recorded noise; :meth:`from_record` gives None for a model without one."""

    def __init__(self, rec: dict):
        self.size = int(rec["size"])
        radial = np.asarray(rec["radial_nps"], np.float64)
        self.filter = np.sqrt(np.clip(radial, 0, None))[ring_index(self.size)]    # (S, S) |H(f)|
        self.std = float(rec["std"])
        self.filter_t = torch.from_numpy(self.filter)                         # the same, for batch()
        rho = rec.get("z_corr")                                                # None: slices independent
        self.rho = None if rho is None else np.asarray(rho, np.float64)[ring_index(self.size)]   # (S, S)
        self.keep = None if rho is None else np.sqrt(1.0 - self.rho ** 2)   # the innovation's share
        self._chains: dict[tuple, tuple[int, np.ndarray]] = {}                # volume -> (z, its spectrum)

    @classmethod
    def from_record(cls, rec: dict | None) -> NoiseModel | None:
        return cls(rec) if rec else None

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One (S, S) float32 noise field from ``rng``."""
        return np.fft.ifft2(self._spectrum(rng)).real.astype(np.float32)

    def _spectrum(self, rng: np.random.Generator) -> np.ndarray:
        """The Fourier transform of one sample: white noise's, filtered by sqrt(NPS)."""
        return np.fft.fft2(rng.standard_normal((self.size, self.size))) * self.filter

    def for_keys(self, base, keys) -> np.ndarray:
        """(N, S, S) noise for the slices named by ``keys`` (tuples of ints, the last one z): the
        same slice gets the same noise however the slices are batched. Independent slices: slice i
        from ``default_rng([*base, *keys[i]])``. With ``z_corr``: the z chain of the slice's volume
        (the key without z), whose innovation at z is drawn from that same seed."""
        if not len(keys):
            return np.zeros((0, self.size, self.size), np.float32)
        keys = [tuple(map(int, k)) for k in keys]
        if self.rho is None:
            return np.stack([self.sample(np.random.default_rng([*base, *k])) for k in keys])
        out = np.empty((len(keys), self.size, self.size), np.float32)
        by_volume: dict[tuple, dict[int, list[int]]] = {}                   # volume -> z -> positions
        for i, k in enumerate(keys):
            by_volume.setdefault(k[:-1], {}).setdefault(k[-1], []).append(i)
        for volume, wanted in by_volume.items():
            for z, field in self._chain((*map(int, base), *volume), sorted(wanted)):
                out[wanted[z]] = field
        return out

    def _chain(self, seed: tuple, zs: list[int]):
        """Yields (z, field) for the increasing ``zs`` of one volume: its AR(1) chain from z 0,
        continued from the state kept when the last call ended just below ``zs[0]``."""
        if zs[0] < 0:
            raise ValueError(f"noise keys need z >= 0, got {zs[0]}")
        z, state = self._chains.get(seed, (-1, None))
        if z >= zs[0]:
            z, state = -1, None
        for target in zs:
            while z < target:
                z += 1
                fresh = self._spectrum(np.random.default_rng([*seed, z]))
                state = fresh if state is None else self.rho * state + self.keep * fresh
            yield z, np.fft.ifft2(state).real.astype(np.float32)
        if len(self._chains) >= CHAINS_KEPT:
            self._chains.clear()
        self._chains[seed] = (z, state)

    def batch(self, n: int, seed_key, device) -> torch.Tensor:
        """(n, 1, S, S) float32 noise on ``device`` for one training step, from ``seed_key`` (e.g.
        ``(seed, rank, step)``): drawn on the CPU so every device draws the same."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([*map(int, seed_key), 17]).generate_state(1)[0]))
        white = torch.randn((n, 1, self.size, self.size), generator=g, dtype=torch.float64)
        field = torch.fft.ifft2(torch.fft.fft2(white) * self.filter_t).real
        return field.to(device=device, dtype=torch.float32)


def case_key(case: str) -> int:
    """A stable integer for a case name (the noise key of its slices; Python's hash() is salted)."""
    return zlib.crc32(case.encode())


__all__ = ["ERODE", "MODES", "NoiseModel", "case_key", "measure", "record"]
