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
* **Sampled** (:meth:`NoiseModel.sample`): white Gaussian noise filtered by sqrt(NPS) in the
  Fourier domain, a stationary field with that spectrum; its standard deviation is the measured one.
* **Training** (:func:`ctsynth.train.gan.gan_step`): the discriminator judges the generated slice
  plus a fresh sample (drawn from ``(train.seed, rank, step)``, so a resumed run draws the same); L1
  compares the noise-free output with the real slice, so the generator has no reason left to draw
  texture of its own. Measured, it still does (the residual stayed above the real one, with the
  sample on top) and flicker rose: off by default (docs/experiments/generator-realism.md, grid 4).
* **Generation** (:class:`ctsynth.synth.inference.MaskToCT`): output + a sample seeded per slice by
  ``(seed, *key)`` (the key names the case and z), so a slice's noise does not depend on batching;
  without a seed the noise-free slice (the conditional mean) comes out.

The noise is stationary and additive: a model of CT's signal-independent noise. MR's noise is
Rician (signal-dependent, non-negative), so ``data.modality: mr`` refuses the option.
The model file holds :func:`record` (``{"source", "radial_nps", "std", "size"}``).
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


@functools.lru_cache(maxsize=8)
def ring_index(size: int) -> np.ndarray:
    """(S, S) integer radial frequency bin of each FFT coefficient (0: DC); cached, so read-only.
    The rings of the noise power spectrum here and of the generator's spectral term
    (:func:`ctsynth.train.gan.radial_log_spectrum`)."""
    f = np.fft.fftfreq(size) * size
    rings = np.rint(np.hypot(*np.meshgrid(f, f, indexing="ij"))).astype(np.int64)
    rings.flags.writeable = False
    return rings


def measure(images: np.ndarray, masks: np.ndarray) -> dict:
    """The noise record of real slices ``images`` (N, S, S) in model units with their structure
    index ``masks`` (N, S, S): see the module doc. ValueError when no structure is big enough."""
    size = images.shape[-1]
    power, pixels = np.zeros((size, size)), 0
    for image, mask in zip(np.asarray(images, np.float64), np.asarray(masks)):
        for value in np.unique(mask[mask > 0]):
            region = ndimage.binary_erosion(mask == value, iterations=ERODE)
            n = int(region.sum())
            if n < MIN_PIXELS:
                continue
            field = np.where(region, image - image[region].mean(), 0.0)
            power += np.abs(np.fft.fft2(field)) ** 2
            pixels += n
    if pixels == 0:
        raise ValueError(f"no structure region of >= {MIN_PIXELS} px after a {ERODE}-px erosion to measure the "
                         f"noise in")
    nps = power / pixels                                                       # (S, S), mean = variance
    rings = ring_index(size)
    radial = np.bincount(rings.ravel(), nps.ravel()) / np.bincount(rings.ravel())
    radial[0] = 0.0                                                            # zero-mean noise
    return record(radial, size)


def record(radial: np.ndarray, size: int) -> dict:
    """The model file's noise record for a radial NPS (per ring, model units² per pixel)."""
    radial = np.asarray(radial, np.float64)
    std = float(np.sqrt(radial[ring_index(size)].mean()))
    return {"source": "nps", "radial_nps": [float(v) for v in radial], "std": std, "size": int(size)}


class NoiseModel:
    """Samples of the recorded noise; :meth:`from_record` gives None for a model without one."""

    def __init__(self, rec: dict):
        self.size = int(rec["size"])
        radial = np.asarray(rec["radial_nps"], np.float64)
        self.filter = np.sqrt(np.clip(radial, 0, None))[ring_index(self.size)]    # (S, S) |H(f)|
        self.std = float(rec["std"])
        self.filter_t = torch.from_numpy(self.filter)                         # the same, for batch()

    @classmethod
    def from_record(cls, rec: dict | None) -> NoiseModel | None:
        return cls(rec) if rec else None

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One (S, S) float32 noise field from ``rng``."""
        white = rng.standard_normal((self.size, self.size))
        return np.fft.ifft2(np.fft.fft2(white) * self.filter).real.astype(np.float32)

    def for_keys(self, base, keys) -> np.ndarray:
        """(N, S, S) noise, slice i from ``default_rng([*base, *keys[i]])``: the same slice gets the
        same noise however the slices are batched."""
        return np.stack([self.sample(np.random.default_rng([*base, *map(int, k)])) for k in keys]) \
            if len(keys) else np.zeros((0, self.size, self.size), np.float32)

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
