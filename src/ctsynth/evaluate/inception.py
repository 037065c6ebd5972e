"""InceptionV3 pool3 features (2048-d) for the standard FID, from wherever the weights can be had.

``evaluate.inception_weights`` decides where the weights come from:

* ``auto`` (default): the standard FID Inception weights (``pt_inception-2015-12-05``, the
  TF-ported network of pytorch-fid, which piq ships as ``piq.feature_extractors.InceptionV3``).
  piq loads them through torch hub: from ``$TORCH_HOME/hub/checkpoints/`` (default
  ``~/.cache/torch``) when they are there, else downloaded once into it. Offline, a failed
  download or a damaged cache file → :class:`MetricUnavailable` with the reason (evaluate then
  reports ``fid_inception: null`` and carries on); nothing is estimated. ``CTSYNTH_OFFLINE=1``
  skips the download attempt (the cache is still used).
* a path: a local torchvision ``inception_v3`` state_dict or the FID ``pt_inception`` weights.
  A missing file is a reason; a file that is not InceptionV3 weights is an error.
* ``null``: off.

Preprocessing as pytorch-fid: [-1,1] grayscale → [0,1] → 3 channels → bilinear resize to 299²
→ [-1,1] (``pt_inception``) or ImageNet mean/std with torchvision's ``transform_input``.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctsynth.core.config import resolve_path
from ctsynth.core.errors import MetricUnavailable, ModelFileError
from ctsynth.evaluate.metrics import to_unit_interval

log = logging.getLogger("ctsynth.evaluate.inception")

AUTO = "auto"
OFFLINE_ENV = "CTSYNTH_OFFLINE"        # set (non-empty): never download, use the cache only
DOWNLOAD_TIMEOUT_S = 30                # per socket operation: a blocked network fails, not hangs
INCEPTION_REASON = ("evaluate.inception_weights is null — fid_inception not computed "
                    "(set it to auto or a local weights file; see README)")

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def inception_module(flavour: str, num_classes: int = 1000, aux_logits: bool = True) -> nn.Module:
    """An uninitialised InceptionV3 of the given flavour ("torchvision" or "pt_inception")."""
    from torchvision.models import inception_v3

    if flavour == "pt_inception":   # TF-ported FID Inception (pytorch-fid / piq): patched blocks
        from piq.feature_extractors.fid_inception import FIDInceptionA, FIDInceptionC, FIDInceptionE1, FIDInceptionE2
        net = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False,
                           transform_input=False)
        net.Mixed_5b, net.Mixed_5c = FIDInceptionA(192, 32), FIDInceptionA(256, 64)
        net.Mixed_5d = FIDInceptionA(288, 64)
        net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
        net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE1(1280), FIDInceptionE2(2048)
        return net
    # torchvision inception_v3, configured as it is when torchvision loads IMAGENET1K_V1
    return inception_v3(weights=None, num_classes=num_classes, aux_logits=aux_logits, init_weights=False,
                        transform_input=True)


def _build_inception(state_dict: dict) -> tuple[nn.Module, str]:
    """Return (InceptionV3 with ``fc = Identity``, flavour) for a torchvision or FID state_dict."""
    fc = state_dict.get("fc.weight")
    if fc is None:
        raise KeyError("no 'fc.weight' entry: not an InceptionV3 state_dict")
    aux = any(k.startswith("AuxLogits.") for k in state_dict)
    flavour = "pt_inception" if int(fc.shape[0]) == 1008 and not aux else "torchvision"
    net = inception_module(flavour, int(fc.shape[0]), aux)
    net.load_state_dict(state_dict)
    net.fc = nn.Identity()
    return net.eval(), flavour


def standard_weights_path() -> Path:
    """Where torch hub keeps the standard FID Inception weights (``$TORCH_HOME/hub/checkpoints/…``)."""
    from piq.feature_extractors.fid_inception import FID_WEIGHTS_URL

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(FID_WEIGHTS_URL).path).name


def _load_standard() -> tuple[nn.Module, Path]:
    """piq's FID InceptionV3 with the standard weights from the torch hub cache or downloaded."""
    from piq.feature_extractors import fid_inception

    cached = standard_weights_path()
    if not cached.exists() and os.environ.get(OFFLINE_ENV):
        raise MetricUnavailable(f"evaluate.inception_weights: auto — {OFFLINE_ENV} is set and the standard "
                                f"FID Inception weights are not in the torch hub cache ({cached}): "
                                f"fid_inception not computed; see README to pre-seed the cache")
    source = "torch hub cache" if cached.exists() else "downloaded into the torch hub cache"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torchvision's deprecation notes on piq's call
            net = fid_inception.InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True)
    except Exception as e:  # URLError/timeout/HTTP error of the download, or an unreadable cache file
        what = f"the cached file is unreadable (delete {cached})" if cached.exists() else "the download failed"
        raise MetricUnavailable(f"evaluate.inception_weights: auto — standard FID Inception weights not "
                                f"available, {what}: {type(e).__name__}: {str(e)[:200]} — fid_inception "
                                f"not computed; see README to pre-seed {cached}") from None
    finally:
        socket.setdefaulttimeout(previous)
    log.info("standard FID InceptionV3 (pt_inception) from the %s: %s", source, cached)
    return net.eval(), cached


def _load_file(weights) -> tuple[nn.Module, str, Path]:
    path = resolve_path(weights)
    if not path.exists():
        raise MetricUnavailable(f"evaluate.inception_weights: {path} not found — fid_inception "
                                f"not computed; see README")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for non-torch / truncated files
        raise ModelFileError(f"{path}: evaluate.inception_weights is not a readable torch file "
                             f"({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: evaluate.inception_weights must hold an InceptionV3 state_dict")
    try:
        model, flavour = _build_inception(state)
    except (RuntimeError, KeyError) as e:
        raise ModelFileError(f"{path}: not InceptionV3 weights (torchvision or pt_inception): "
                             f"{str(e).splitlines()[0]}") from None
    log.info("InceptionV3 (%s) loaded from %s", flavour, path)
    return model, flavour, path


class InceptionFeatures:
    """InceptionV3 pool3 features (2048-d) for ``evaluate.inception_weights`` (auto | path | null).

    ``flavour``: "pt_inception" (the standard FID network) or "torchvision"; ``path``: the weights
    file used; ``standard``: True for the auto-loaded standard FID weights.
    """

    dim = 2048

    def __init__(self, weights: str | Path | None):
        if not weights:
            raise MetricUnavailable(INCEPTION_REASON)
        self.standard = str(weights) == AUTO
        if self.standard:
            self.model, self.path = _load_standard()
            self.flavour = "pt_inception"
        else:
            self.model, self.flavour, self.path = _load_file(weights)

    @torch.inference_mode()
    def features(self, x) -> torch.Tensor:
        """Images (B,S,S) in [-1,1] → pool3 features (B, 2048) float32."""
        x = to_unit_interval(x).expand(-1, 3, -1, -1)                        # (B, 3, S, S) in [0,1]
        if self.standard:                                                     # piq: resize, [-1,1], blocks
            return self.model(x)[0].flatten(1)                                # (B, 2048)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        x = (x - _IMAGENET_MEAN) / _IMAGENET_STD if self.flavour == "torchvision" else 2 * x - 1
        return self.model(x).flatten(1)                                      # (B, 2048)
