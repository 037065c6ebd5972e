"""Paired training augmentation (``train.augment``), applied to each training batch on the
training device; the same random geometric draw warps a slice's image and its condition::

    augment = build_augment(params.train.augment)     # once per run
    cond, real = augment(cond, real)                  # (B, C, S, S), (B, 1, S, S) in [-1, 1]

* ``none``: the identity: the very same tensors come back, nothing is built or drawn.
* ``affine``: kornia ``RandomAffine`` per slice with p = 0.8: rotation ±10°, translation up to
  ±6 % of the side, isotropic scale 0.9–1.1 about the centre (mild, anatomy-plausible). The image
  is resampled bilinearly and filled with -1 outside the warped field (air: -1000 HU at the
  default window); the condition is resampled nearest-neighbour, so it keeps exactly its values
  (one-hot or label indices), and filled with 0 (background); a condition of partial-volume
  fractions (``preprocess.partial_volume`` > 1) is resampled bilinearly, as the image is.
* ``affine+intensity``: then, on the image only, contrast ``a·x`` with a in [0.9, 1.1] (about the
  window centre, 0 HU by default) and brightness ``x + b`` with b in [-0.05, 0.05] (±50 HU),
  each with p = 0.5, and Gaussian noise of σ 0.02 (20 HU) with p = 0.5; clamped to [-1, 1].
* ``classic``: the segmentation baseline's augmentation (``segmenter.augment``), after nnU-Net's
  2-D pipeline: a wider ``RandomAffine`` (rotation ±15°, translation ±6 %, scale 0.85–1.25, p = 0.8),
  an elastic deformation (kornia ``RandomElasticTransform``, Gaussian-smoothed random field of
  σ 8 px and amplitude α = 1 in normalised coordinates, p = 0.2), then on the image only the
  intensity steps of ``affine+intensity`` with stronger contrast (0.75–1.25), a Gaussian blur
  (σ 0.5–1 px, p = 0.2) and Gaussian noise of σ 0.03 (p = 0.5).

Randomness: kornia samples the parameters on the CPU from torch's global generator, which
training seeds with ``train.seed`` and checkpoints save and restore, so CPU runs are bit-for-bit
repeatable, resume continues the same draws, and the draws do not depend on the device. Every DDP
rank starts from the same seed and so draws the same parameters, for its own, different slices.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ctsynth.core.config import with_training_seeds
from ctsynth.core.errors import ConfigError

AUGMENTS = ("none", "affine", "affine+intensity", "classic")
AFFINE = {"degrees": 10.0, "translate": (0.06, 0.06), "scale": (0.9, 1.1), "p": 0.8}
CLASSIC_AFFINE = {"degrees": 15.0, "translate": (0.06, 0.06), "scale": (0.85, 1.25), "p": 0.8}
CLASSIC_ELASTIC = {"kernel_size": (33, 33), "sigma": (8.0, 8.0), "alpha": (1.0, 1.0), "p": 0.2}
CLASSIC_CONTRAST, CLASSIC_NOISE_STD = (0.75, 1.25), 0.03
CLASSIC_BLUR = {"kernel_size": 5, "sigma": (0.5, 1.0), "p": 0.2}
CONTRAST, BRIGHTNESS, NOISE_STD, INTENSITY_P = (0.9, 1.1), (0.95, 1.05), 0.02, 0.5
IMAGE_FILL, CONDITION_FILL = -1.0, 0.0

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _identity(cond: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cond, real


class PairedAugment(torch.nn.Module):
    """A kornia ``AugmentationSequential`` over (image, condition as a mask), then a clamp."""

    def __init__(self, mode: str, constant_channels: int = 0, soft_condition: bool = False):
        super().__init__()
        self.constant = int(constant_channels)          # trailing condition planes that hold a per-slice value
        import kornia.augmentation as K
        from kornia.constants import DataKey, Resample

        classic = mode == "classic"
        steps = [K.RandomAffine(**(CLASSIC_AFFINE if classic else AFFINE), resample="bilinear", padding_mode="fill",
                                fill_value=torch.tensor(IMAGE_FILL))]
        if classic:                         # elastic warps the mask too (nearest); the rest is the image's
            steps += [K.RandomElasticTransform(**CLASSIC_ELASTIC, padding_mode="border"),
                      K.RandomContrast(CLASSIC_CONTRAST, clip_output=False, p=INTENSITY_P),
                      K.RandomBrightness(BRIGHTNESS, clip_output=False, p=INTENSITY_P),
                      K.RandomGaussianBlur(**CLASSIC_BLUR),
                      K.RandomGaussianNoise(std=CLASSIC_NOISE_STD, p=INTENSITY_P)]
        if mode == "affine+intensity":      # intensity steps leave the mask key untouched
            steps += [K.RandomContrast(CONTRAST, clip_output=False, p=INTENSITY_P),
                      K.RandomBrightness(BRIGHTNESS, clip_output=False, p=INTENSITY_P),
                      K.RandomGaussianNoise(std=NOISE_STD, p=INTENSITY_P)]
        # A one-element fill_value pads masks too unless the mask's extra_args name their own; these
        # extra_args replace kornia's default for masks, so the resampling is named again: nearest keeps
        # class values exact; partial-volume fractions are resampled like the image (bilinear).
        mask_args = {"resample": Resample.BILINEAR if soft_condition else Resample.NEAREST, "align_corners": None,
                     "fill_value": torch.tensor(CONDITION_FILL)}
        self.seq = K.AugmentationSequential(*steps, data_keys=["input", "mask"],
                                            extra_args={DataKey.MASK: mask_args})

    def forward(self, cond: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.constant:
            real, cond = self.seq(real, cond)
            return cond, real.clamp_(-1.0, 1.0)
        masks, planes = cond[:, :-self.constant], cond[:, -self.constant:]     # a constant plane stays whole
        real, masks = self.seq(real, masks)
        return torch.cat([masks, planes], dim=1), real.clamp_(-1.0, 1.0)


def build_augment(mode: str, constant_channels: int = 0, key: str = "train.augment",
                  soft_condition: bool = False) -> Augment:
    """The batch augmentation of ``train.augment`` or ``segmenter.augment`` (one of :data:`AUGMENTS`).
    The last ``constant_channels`` of the condition (the contrast level's plane) are not warped: a
    constant needs no geometry, and warping would fill its border with background."""
    if mode not in AUGMENTS:
        raise ConfigError(f"{key}: {mode!r}; allowed: {', '.join(AUGMENTS)}")
    return _identity if mode == "none" else PairedAugment(mode, constant_channels, soft_condition)


def augment_labelled(augment: Augment, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A segmentation batch through a paired augmentation: images (B, S, S) in [-1, 1] and
    structure-index masks (B, S, S) int64; the mask is warped as a one-plane condition
    (nearest neighbour, filled with background), so it keeps exactly its label values."""
    cond, real = augment(masks[:, None].float(), images[:, None])
    return real[:, 0], cond[:, 0].round().long()



def build_anatomy_drop(params, structures: list[str], rank: int = 0):
    """``train.anatomy_drop`` > 0 with ``model.anatomy``: a function ``(cond, step) -> cond`` blanking the
    anatomy channels of each slice with that probability, drawn from ``(train.seed, rank, step)`` (a
    resumed run draws the same), so the model also learns to draw from heart labels alone (the
    condition's anatomy channels all zero, as :class:`ctsynth.synth.inference.MaskToCT` passes them
    when a user has none); None otherwise. With ``model.disc_slices`` k > 1 one draw holds for each
    slab of k consecutive batch slices (the discriminator sees the slab's conditions together)."""
    rate, m = params.train.anatomy_drop, params.model
    k = getattr(m, "disc_slices", 1)
    if not (m.anatomy and rate > 0):
        return None
    from ctsynth.data.store import anatomy_slice

    where = anatomy_slice(structures, m.encoding, m.context_slices)
    seed = with_training_seeds(params).train.seed

    def drop(cond: torch.Tensor, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, step])
                                              .generate_state(1)[0]))
        keep = (torch.rand(len(cond) // k, generator=g) >= rate).repeat_interleave(k).to(cond.device, cond.dtype)
        cond = cond.clone()
        cond[:, where] *= keep.view(-1, 1, 1, 1)
        return cond
    return drop


def build_batch_transform(params, constant_channels: int, structures: list[str], rank: int = 0,
                          noise_record: dict | None = None, soft_condition: bool = False):
    """What the training loop does to each batch: ``(cond, real, step) -> (cond, real, fake_noise)``,
    the paired augmentation (``train.augment``), then the anatomy drop (``train.anatomy_drop``), if
    any; ``fake_noise``: with a noise record (``model.noise``), a (B, 1, S, S) sample of
    :class:`ctsynth.data.noise.NoiseModel` drawn from ``(train.seed, rank, step)`` for the
    discriminator to see on the generated slices, else None. ``soft_condition``: the condition holds
    partial-volume fractions (``preprocess.partial_volume`` > 1), resampled bilinearly.
    With ``model.disc_slices`` k > 1 the batch is slabs of k consecutive slices back to back
    (:class:`ctsynth.data.store.SlabDataset`), and each slab is warped as one: one geometric (and
    intensity) draw for all its slices, as one scanner position holds for neighbouring slices."""
    from ctsynth.data.noise import NoiseModel

    augment = build_augment(params.train.augment, constant_channels, soft_condition=soft_condition)
    drop = build_anatomy_drop(params, structures, rank)
    noise = NoiseModel.from_record(noise_record)
    seed = with_training_seeds(params).train.seed
    k = getattr(params.model, "disc_slices", 1)

    def transform(cond: torch.Tensor, real: torch.Tensor, step: int):
        if k == 1:
            cond, real = augment(cond, real)
        else:
            cond, real = _from_slabs(*augment(*_to_slabs(cond, real, k, constant_channels)), k, constant_channels)
        fake_noise = None if noise is None else noise.batch(len(real), (seed, rank, step), real.device)
        return (drop(cond, step) if drop else cond), real, fake_noise
    return transform


def _to_slabs(cond: torch.Tensor, real: torch.Tensor, k: int, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices (B, C, S, S), (B, 1, S, S), slabs of k back to back -> one item per slab: the slices'
    warped channels stacked (B/k, k·(C - constant) + constant, S, S) with the slab's constant planes
    (one case's contrast level: its first slice's) at the end, and the images (B/k, k, S, S)."""
    n, c, size = len(cond), cond.shape[1] - constant, cond.shape[-2:]
    warped = cond[:, :c].reshape(n // k, k * c, *size)
    return torch.cat([warped, cond[::k, c:]], dim=1), real.reshape(n // k, k, *size)


def _from_slabs(cond: torch.Tensor, real: torch.Tensor, k: int, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`_to_slabs`: slabs back to (B, C, S, S), (B, 1, S, S)."""
    n, size = len(cond), cond.shape[-2:]
    c = (cond.shape[1] - constant) // k
    warped = cond[:, :k * c].reshape(n * k, c, *size)
    return (torch.cat([warped, cond[:, k * c:].repeat_interleave(k, dim=0)], dim=1),
            real.reshape(n * k, 1, *size))


__all__ = ["AUGMENTS", "PairedAugment", "augment_labelled", "build_anatomy_drop", "build_augment",
           "build_batch_transform"]
