"""The mask-conditioned cGAN: encoder-decoder generator and PatchGAN discriminator.

Paper preset (Habijan et al.; the authors' published config, as ``params/paper.yaml``)::

    Generator:  7 x [Conv 4x4 s2]  ->  7 x [ConvTranspose 4x4 s2]   (ngf 64, filters capped at 512)
    Discriminator on concat(image, condition):
                4 x [Conv 4x4 s2] (64-128-256-512) + Conv 4x4 s1 -> 1 channel
                256² input -> 16 x 16 patches, receptive field 94 px

Every layer but the first and the last has BatchNorm followed by LeakyReLU(0.2) -- the paper's
text, which names LeakyReLU for the deconvolution layers too (pix2pix/Keras-GAN use ReLU on the
up path; the difference is small and we follow the paper). Convolutions followed by BatchNorm
have no bias. No noise input: the model is deterministic, as in the paper; dropout (pix2pix's
"noise") stays an option on the three innermost up-blocks.

The generator always returns images in model space [-1, 1]: with ``output: sigmoid`` (the
authors' choice on [0, 1] targets) the sigmoid is mapped affinely onto [-1, 1], so every
consumer sees one convention.

The model file written by :func:`save_generator` holds only tensors and plain python values
(``torch.load(weights_only=True)`` works) and everything needed to rebuild and run the
generator without params.yaml: model config, input channels and the preprocessing meta.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from kornia.filters import gaussian_blur2d
from torch import nn
from torch.nn import functional as F

from ctsynth.core.errors import ModelFileError
from ctsynth.core.io import save_torch

log = logging.getLogger(__name__)

MODEL_FORMAT = "ctsynth-generator"
MODEL_VERSION = 1
_PREPROCESS_KEYS = ("image_size", "hu_window", "structures", "label_map", "encoding")


def _cfg_dict(model_cfg: Any) -> dict:
    """ModelCfg dataclass or plain dict -> plain dict."""
    if dataclasses.is_dataclass(model_cfg):
        return dataclasses.asdict(model_cfg)
    return dict(model_cfg)


def _filters(base: int, level: int) -> int:
    """Filters of encoder level ``level`` (0-based): base * (1, 2, 4, 8, 8, ...), capped at 8 * base."""
    return base * min(2 ** level, 8)


# ----------------------------------------------------------------------------------- generator

class Generator(nn.Module):
    """Encoder-decoder ("UNet" when ``skip_connections``) mapping a condition to a CT slice.

    ::

        cond (B,C,S,S) -down0-> e0 (ngf,S/2) -down1-> e1 (2ngf,S/4) ... -> e[d-1] (S/2^d)
                                 |  skip                 |  skip
        out (B,1,S,S) <-up0- [u1 ++ e0] <-up1- [u2 ++ e1] ... <-up[d-1]- e[d-1]

    ``++`` is channel concatenation (only with skip connections). With ``head_layers`` k > 0, up0
    gives ngf features at S (BatchNorm, LeakyReLU) and k 3x3 convs at S read them beside the
    condition itself (a full-resolution skip, as the original UNet's top level): pix2pix's output is
    a stride-2 transposed conv of S/2 features, so no layer sees the mask at the output's resolution.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, depth: int = 7, ngf: int = 64,
                 skip_connections: bool = True, upsample: str = "transpose", *, dropout: float = 0.0,
                 output: str = "tanh", output_blur: float = 0.0, head_layers: int = 0):
        super().__init__()
        if upsample not in ("transpose", "resize"):
            raise ValueError(f"upsample must be 'transpose' or 'resize', got {upsample!r}")
        if output not in ("tanh", "sigmoid"):
            raise ValueError(f"output must be 'tanh' or 'sigmoid', got {output!r}")
        if output_blur < 0:
            raise ValueError(f"output_blur must be >= 0 (a Gaussian sigma in px), got {output_blur!r}")
        if head_layers < 0:
            raise ValueError(f"head_layers must be >= 0 (3x3 convs at full resolution), got {head_layers!r}")
        self.depth, self.skip, self.output = depth, skip_connections, output
        self.output_blur = float(output_blur)
        ch = [_filters(ngf, i) for i in range(depth)]               # encoder level widths
        self.down = nn.ModuleList()
        for i in range(depth):
            cin = in_channels if i == 0 else ch[i - 1]
            if i == 0:                                              # first layer: no norm
                block = nn.Sequential(nn.Conv2d(cin, ch[0], 4, 2, 1), nn.LeakyReLU(0.2, True))
            else:
                block = nn.Sequential(nn.Conv2d(cin, ch[i], 4, 2, 1, bias=False),
                                      nn.BatchNorm2d(ch[i]), nn.LeakyReLU(0.2, True))
            self.down.append(block)
        # up[i] produces encoder level i-1's resolution (i = depth-1 .. 1), up[0] the output.
        self.up = nn.ModuleList()
        for i in range(depth):
            cin = ch[i] if (i == depth - 1 or not skip_connections) else 2 * ch[i]
            last = i == 0 and head_layers == 0
            cout = out_channels if last else (ch[i - 1] if i > 0 else ngf)
            layers: list[nn.Module] = [self._upconv(cin, cout, upsample, bias=last)]
            if not last:
                layers += [nn.BatchNorm2d(cout)]
                if dropout > 0 and i >= depth - 3:                  # three innermost up-blocks
                    layers += [nn.Dropout(dropout)]
                layers += [nn.LeakyReLU(0.2, True)]
            self.up.append(nn.Sequential(*layers))
        self.head = self._head(ngf + in_channels, ngf, out_channels, head_layers) if head_layers else None

    @staticmethod
    def _head(cin: int, width: int, cout: int, layers: int) -> nn.Sequential:
        """``layers`` 3x3 convs at full resolution: (BatchNorm, LeakyReLU) between, a bias on the last."""
        blocks: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            blocks.append(nn.Conv2d(cin if i == 0 else width, cout if last else width, 3, 1, 1, bias=last))
            if not last:
                blocks += [nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True)]
        return nn.Sequential(*blocks)

    @staticmethod
    def _upconv(cin: int, cout: int, mode: str, bias: bool) -> nn.Module:
        if mode == "transpose":
            return nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)     # (B,cin,h,w)->(B,cout,2h,2w)
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),  # resize + 3x3 conv
                             nn.Conv2d(cin, cout, 3, 1, 1, bias=bias))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        # cond: (B, C, S, S) -> image (B, 1, S, S) in [-1, 1]
        feats = []
        x = cond
        for block in self.down:
            x = block(x)                                            # (B, ch[i], S/2^(i+1), ...)
            feats.append(x)
        x = self.up[-1](feats[-1])                                  # (B, ch[d-2], S/2^(d-1), ...)
        for i in range(self.depth - 2, -1, -1):
            if self.skip:
                x = torch.cat([x, feats[i]], dim=1)                 # (B, 2*ch[i], S/2^(i+1), ...)
            x = self.up[i](x)                                       # (B, ch[i-1] or 1, S/2^i, ...)
        if self.head is not None:                                   # (B, ngf + C, S, S) -> (B, 1, S, S)
            x = self.head(torch.cat([x, cond], dim=1))
        x = 2.0 * torch.sigmoid(x) - 1.0 if self.output == "sigmoid" else torch.tanh(x)
        if self.output_blur > 0:                                    # fine texture out of the generator's reach
            radius = math.ceil(3 * self.output_blur)
            x = gaussian_blur2d(x, (2 * radius + 1,) * 2, (self.output_blur,) * 2, border_type="reflect")
        return x


# ------------------------------------------------------------------------------- discriminator

class PatchDiscriminator(nn.Module):
    """PatchGAN on concat(image, condition): ``layers`` 4x4 stride-2 blocks + a 4x4 stride-1 conv.

    Padding follows Keras 'same' (the authors' framework): 1 on each side for the stride-2
    convs, (1 before, 2 after) for the final stride-1 conv, so a 256² input gives exactly
    256 / 2^layers patches (16 x 16 for the paper preset). The output is a raw score per patch
    (least-squares GAN: targets 1 for real, 0 for fake; no sigmoid).
    """

    def __init__(self, in_channels: int, ndf: int = 64, layers: int = 4):
        super().__init__()
        blocks: list[nn.Module] = []
        cin = in_channels
        for i in range(layers):
            cout = _filters(ndf, i)
            if i == 0:                                              # first layer: no norm
                blocks += [nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            else:
                blocks += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                           nn.LeakyReLU(0.2, True)]
            cin = cout
        blocks += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(cin, 1, 4, 1, 0)]  # Keras 'same', stride 1
        self.net = nn.Sequential(*blocks)

    def forward(self, image: torch.Tensor, cond: torch.Tensor, features: bool = False):
        """image (B, 1, S, S), cond (B, C, S, S) -> patch scores (B, 1, S/2^L, S/2^L); with ``features``
        also the activation of every block (after its LeakyReLU), for feature matching."""
        x = torch.cat([image, cond], dim=1)
        if not features:
            return self.net(x)
        feats = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                feats.append(x)
        return x, feats


class SlabDiscriminator(nn.Module):
    """A z-aware PatchGAN (``model.disc_slices`` k > 1): judges k consecutive slices of one case
    together, so a slice-to-slice change real volumes do not make (flicker) is something it can see.

    The batch holds slabs back to back (slices ``i·k .. i·k + k - 1`` are one slab, as
    :class:`ctsynth.data.store.SlabDataset` and :func:`ctsynth.data.augment.build_batch_transform` lay
    them out); each slab's k images and k conditions become the channels of one
    :class:`PatchDiscriminator` input, ``concat(image_1..k, cond_1..k)``. Patch scores and block
    features are per slab: (B / k, 1, P, P). The generator stays 2-D: it draws every slice alone."""

    def __init__(self, in_channels: int, slices: int, ndf: int = 64, layers: int = 4):
        super().__init__()
        if slices < 2:
            raise ValueError(f"a slab discriminator judges >= 2 slices together, got {slices!r}")
        self.slices = slices
        self.patch = PatchDiscriminator(slices * in_channels, ndf=ndf, layers=layers)

    def forward(self, image: torch.Tensor, cond: torch.Tensor, features: bool = False):
        """image (B, 1, S, S), cond (B, C, S, S), B a multiple of k -> what :class:`PatchDiscriminator`
        returns for the B / k slabs."""
        k, n = self.slices, image.shape[0]
        if n % k:
            raise ValueError(f"a batch of {n} slices is not whole slabs of {k}")
        slab = (n // k, -1, *image.shape[2:])
        w = self.patch.net[0].weight                                 # the slabs in the weights' memory format
        mem = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return self.patch(image.reshape(slab).contiguous(memory_format=mem),
                          cond.reshape(slab).contiguous(memory_format=mem), features)


class MultiScaleDiscriminator(nn.Module):
    """pix2pixHD's multi-scale discriminator (``model.disc_scales`` n > 1; Wang et al. 2018): n
    discriminators of one architecture (PatchGAN, or slab), the i-th judging image and condition
    downsampled i times (3x3 average pool, stride 2, padding 1 not counted, as pix2pixHD), so the
    coarser ones see more of the slice per patch with the same weights budget.

    Scores: each scale's patch scores, the coarser ones repeated (nearest) onto the finest scale's
    grid, as channels (B', n, P, P): an LSGAN loss averaged over them is the mean of the per-scale
    losses (pix2pixHD sums them: the same up to 1/n). Block features: every scale's, finest first."""

    def __init__(self, scales: list[nn.Module]):
        super().__init__()
        if len(scales) < 2:
            raise ValueError(f"a multi-scale discriminator has >= 2 scales, got {len(scales)}")
        self.scales = nn.ModuleList(scales)

    def forward(self, image: torch.Tensor, cond: torch.Tensor, features: bool = False):
        scores, feats = [], []
        for i, d in enumerate(self.scales):
            if i:
                image, cond = (F.avg_pool2d(t, 3, 2, 1, count_include_pad=False) for t in (image, cond))
            out = d(image, cond, features)
            s, f = out if features else (out, [])
            scores.append(s if i == 0 else F.interpolate(s, size=scores[0].shape[-2:], mode="nearest"))
            feats += f
        joined = torch.cat(scores, dim=1)
        return (joined, feats) if features else joined


# ------------------------------------------------------------------------------------ builders

def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """pix2pix init: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


def build_generator(model_cfg: Any, in_channels: int) -> Generator:
    """Generator from a ``ModelCfg`` (or its dict), weights initialised pix2pix style."""
    c = _cfg_dict(model_cfg)
    g = Generator(in_channels, 1, depth=c["gen_depth"], ngf=c["ngf"],
                  skip_connections=c["skip_connections"], upsample=c["upsample"],
                  dropout=c["dropout"], output=c["output"], output_blur=c.get("output_blur", 0.0),
                  head_layers=c.get("head_layers", 0))
    init_weights(g)
    return g


def build_discriminator(model_cfg: Any, in_channels: int) -> nn.Module:
    """PatchGAN for ``in_channels`` condition channels (+1 image channel); with ``disc_slices`` k > 1
    the z-aware :class:`SlabDiscriminator` over k such slices; with ``disc_scales`` n > 1 n of them in
    a :class:`MultiScaleDiscriminator`."""
    c = _cfg_dict(model_cfg)
    k, n = c.get("disc_slices", 1), c.get("disc_scales", 1)

    def one() -> nn.Module:
        if k == 1:
            return PatchDiscriminator(in_channels + 1, ndf=c["ndf"], layers=c["disc_layers"])
        return SlabDiscriminator(in_channels + 1, k, ndf=c["ndf"], layers=c["disc_layers"])
    d = one() if n == 1 else MultiScaleDiscriminator([one() for _ in range(n)])
    init_weights(d)
    return d


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- receptive field

def _rf(kernels_strides: list[tuple[int, int]]) -> tuple[int, int]:
    """(receptive field, jump) of a chain of convolutions, in input pixels."""
    rf, jump = 1, 1
    for k, s in kernels_strides:
        rf += (k - 1) * jump
        jump *= s
    return rf, jump


def _generator_footprint(depth: int, skip: bool, upsample: str, o: int, head: int = 0) -> tuple[int, int]:
    """Input pixels [lo, hi] (one axis, no borders) that output pixel ``o`` depends on (``head``: 3x3
    convs at full resolution after up0, which also read the condition: they widen every path by 1 px
    a side each)."""
    def up_back(a: int, b: int) -> tuple[int, int]:               # one up layer, output -> input
        if upsample == "transpose":                                # k4 s2 p1: i*2-1 <= o <= i*2+2
            return -((-(a - 2)) // 2), (b + 1) // 2
        return (a - 1) // 2, (b + 1) // 2                          # nearest x2, then 3x3 conv

    def enc_back(a: int, b: int, level: int) -> tuple[int, int]:  # k4 s2 p1 convs down to the input
        for _ in range(level):
            a, b = 2 * a - 1, 2 * b + 2
        return a, b

    def dec(a: int, b: int, r: int) -> tuple[int, int]:           # [a, b] produced by up[r]
        a, b = up_back(a, b)                                       # at resolution r + 1
        if r + 1 == depth:
            return enc_back(a, b, depth)
        lo, hi = dec(a, b, r + 1)
        if skip:
            slo, shi = enc_back(a, b, r + 1)
            lo, hi = min(lo, slo), max(hi, shi)
        return lo, hi

    return dec(o - head, o + head, 0)


def receptive_field(module_or_cfg: Any, net: str = "discriminator") -> int:
    """Receptive field in input pixels of one output element, computed analytically.

    * a :class:`PatchDiscriminator` (or ``net="discriminator"`` with a ModelCfg/dict): its conv
      chain; the paper preset (4 x k4s2 + k4s1) gives 1 + 3·(1+2+4+8+16) = 94. A slab discriminator
      has its PatchGAN's field in-plane; a multi-scale one its coarsest scale's (the pools included).
    * a :class:`Generator` (or ``net="generator"``): the input interval each output pixel reads,
      propagated back through every path (skips included), maximised over output positions.
    """
    pools: list[tuple[int, int]] = []                             # multi-scale: the coarsest scale's pooling
    if isinstance(module_or_cfg, MultiScaleDiscriminator):
        pools = [(3, 2)] * (len(module_or_cfg.scales) - 1)
        module_or_cfg = module_or_cfg.scales[0]
    if isinstance(module_or_cfg, SlabDiscriminator):
        module_or_cfg = module_or_cfg.patch
    if isinstance(module_or_cfg, PatchDiscriminator):
        convs = [m for m in module_or_cfg.modules() if isinstance(m, nn.Conv2d)]
        return _rf(pools + [(m.kernel_size[0], m.stride[0]) for m in convs])[0]
    if isinstance(module_or_cfg, Generator):
        g = module_or_cfg
        depth, skip, head = g.depth, g.skip, sum(isinstance(m, nn.Conv2d) for m in (g.head or []))
        upsample = "transpose" if any(isinstance(m, nn.ConvTranspose2d) for m in g.modules()) else "resize"
    else:
        c = _cfg_dict(module_or_cfg)
        if net == "discriminator":
            return _rf([(3, 2)] * (c.get("disc_scales", 1) - 1) + [(4, 2)] * c["disc_layers"] + [(4, 1)])[0]
        if net != "generator":
            raise ValueError(f"net must be 'discriminator' or 'generator', got {net!r}")
        depth, skip, upsample = c["gen_depth"], c["skip_connections"], c["upsample"]
        head = c.get("head_layers", 0)
    spans = [_generator_footprint(depth, skip, upsample, o, head) for o in range(2 ** (depth + 1))]
    return max(hi - lo + 1 for lo, hi in spans)


# ---------------------------------------------------------------------------------- model file


def describe(G: nn.Module, D: nn.Module, model_cfg: Any, size: int) -> str:
    """One line on the two networks (for the training log)."""
    scales = len(D.scales) if isinstance(D, MultiScaleDiscriminator) else 1
    return (f"generator: {count_parameters(G):,} parameters, depth {model_cfg.gen_depth}, skips "
            f"{model_cfg.skip_connections}, full-resolution head {model_cfg.head_layers}, "
            f"receptive field {receptive_field(model_cfg, 'generator')} px; "
            f"discriminator: {count_parameters(D):,} parameters, {(size // 2 ** model_cfg.disc_layers) ** 2} "
            + (f"patches of {receptive_field(D)} px receptive field" if scales == 1 else
               f"patches at the finest of {scales} scales, receptive field up to {receptive_field(D)} px")
            + (f", judging {model_cfg.disc_slices} consecutive slices together" if model_cfg.disc_slices > 1 else ""))


def _check_plain(obj: Any, where: str) -> None:
    """Only tensors and plain python values may go into a model file (weights_only loading)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be str or int")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"{where}: {type(obj).__name__} is not a tensor or plain python value")


def save_generator(path: str | Path, generator: nn.Module, model_cfg_dict: Mapping,
                   in_channels: int, preprocess_meta: Mapping, extra: Mapping | None = None) -> None:
    """Write the generator atomically: fp32 contiguous weights + config + preprocessing meta.

    ``preprocess_meta`` must hold image_size, hu_window, structures, label_map and encoding.
    """
    missing = [k for k in _PREPROCESS_KEYS if k not in preprocess_meta]
    if missing:
        raise ValueError(f"preprocess_meta lacks {missing}")
    raw = getattr(generator, "module", generator)
    raw = getattr(raw, "_orig_mod", raw)                      # unwrap torch.compile
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in raw.state_dict().items()}
    preprocess = dict(preprocess_meta)
    preprocess["label_map"] = {str(k): v for k, v in dict(preprocess["label_map"]).items()}
    blob = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "model_cfg": _cfg_dict(model_cfg_dict),
            "in_channels": int(in_channels), "preprocess": preprocess, "extra": dict(extra or {}),
            "state_dict": state}
    _check_plain(blob, "model file")
    save_torch(path, blob)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """Rebuild a generator saved by :func:`save_generator`; returns (model in eval mode, meta).

    ``meta`` = {"model_cfg", "in_channels", "preprocess", "extra", "version"}. Raises
    :class:`ModelFileError` for a missing, corrupt or non-ctsynth file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found (train one with `dvc repro train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError,
            ValueError, AttributeError, TypeError) as e:
        raise ModelFileError(f"{path}: not a readable model file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        hint = " (it looks like a training checkpoint)" if isinstance(blob, dict) and "G" in blob else ""
        raise ModelFileError(f"{path}: not a ctsynth generator file{hint}")
    if blob.get("version") != MODEL_VERSION:
        raise ModelFileError(f"{path}: model file version {blob.get('version')!r} is not supported "
                             f"(this ctsynth reads version {MODEL_VERSION})")
    try:
        model = build_generator(blob["model_cfg"], int(blob["in_channels"]))
        model.load_state_dict(blob["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: model file is inconsistent ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]})") from None
    meta = {k: blob[k] for k in ("model_cfg", "in_channels", "preprocess", "extra", "version")}
    return model.to(device).eval(), meta
