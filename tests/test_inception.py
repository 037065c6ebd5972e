"""evaluate.inception_weights: auto (standard FID weights via piq / torch hub), offline, failures."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import standin_inception_weights
from ctsynth.core.errors import MetricUnavailable
from ctsynth.evaluate.inception import InceptionFeatures, standard_weights_path

UNREACHABLE = "http://127.0.0.1:9/fid_weights/pt_inception-2015-12-05-6726825d.pth"   # refused at once


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _images(seed: int = 0):
    return torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_auto_uses_the_torch_hub_cache_even_offline(torch_home):
    cached = standin_inception_weights(standard_weights_path())
    assert cached.parent == torch_home / "hub" / "checkpoints" and cached.stat().st_size < 2_000_000
    inc = InceptionFeatures("auto")                        # CTSYNTH_OFFLINE=1 (conftest): cache only
    assert inc.standard and inc.flavour == "pt_inception" and inc.path == cached
    x = _images()
    feats = inc.features(x)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    assert (feats[0] - feats[1]).abs().max() > 1e-3 * feats.abs().max()   # distinct images, distinct features
    # piq's FID InceptionV3 + its preprocessing == our pt_inception network loaded from the same file
    local = InceptionFeatures(cached)
    assert local.flavour == "pt_inception" and not local.standard
    assert torch.allclose(local.features(x), feats, rtol=1e-4, atol=1e-6 * feats.abs().max())


def test_auto_download_failure_is_a_reason_not_an_error(torch_home, monkeypatch):
    from piq.feature_extractors import fid_inception

    monkeypatch.delenv("CTSYNTH_OFFLINE")
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_URL", UNREACHABLE)
    with pytest.raises(MetricUnavailable) as err:
        InceptionFeatures("auto")
    text = str(err.value)
    assert "download failed" in text and "URLError" in text and "fid_inception not computed" in text
    assert str(standard_weights_path()) in text
    assert not standard_weights_path().exists()


def test_offline_env_never_tries_to_download(torch_home, monkeypatch):
    from piq.feature_extractors import fid_inception

    def no_download(*args, **kwargs):
        raise AssertionError("download attempted although CTSYNTH_OFFLINE is set")

    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", no_download)
    with pytest.raises(MetricUnavailable, match="CTSYNTH_OFFLINE is set"):
        InceptionFeatures("auto")


def test_damaged_cache_file_is_a_reason(torch_home):
    path = standard_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(MetricUnavailable, match="cached file is unreadable"):
        InceptionFeatures("auto")


# ------------------------------------------------------------------ against the reference FID

WEIGHTS_ENV = "CTSYNTH_FID_WEIGHTS"      # the standard pt_inception-2015-12-05-6726825d.pth, if not in the cache


def _local_standard_weights() -> tuple[Path | None, list[Path]]:
    """The real FID Inception weights on this machine: $CTSYNTH_FID_WEIGHTS, else torch hub's default
    cache (~/.cache/torch, or $XDG_CACHE_HOME/torch). conftest points $TORCH_HOME at an empty folder
    so that no other test picks them up; this one looks where torch would have looked."""
    name = standard_weights_path().name
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    candidates = ([Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []) + \
        [cache / "torch" / "hub" / "checkpoints" / name]
    return next((p for p in candidates if p.is_file()), None), candidates


def test_fid_inception_equals_pytorch_fid_on_the_standard_weights(tmp_path, monkeypatch):
    """Our fid_inception features (auto: piq's network from the torch hub cache; and the same file
    given as a path: our own pt_inception network) equal pytorch-fid's pool3 features on the same
    images to float32 rounding (rtol 1e-4, atol 1e-4 × the largest feature), and our exact FD equals
    pytorch-fid's scipy-sqrtm FD of its own features to rel 1e-3 (its sqrtm of the rank-deficient
    2048² product of 6-image covariances is the less exact of the two; that one sqrtm takes 10 s to
    2 min on a CPU). Runs only where the real weights and pytorch-fid are installed; skipped, saying
    which is missing, everywhere else (CI: conftest empties $TORCH_HOME and pytorch-fid is no dependency)."""
    weights, looked = _local_standard_weights()
    missing = []
    if weights is None:
        missing.append(f"the standard FID Inception weights are not on this machine (looked for "
                       f"{', '.join(map(str, looked))}; set ${WEIGHTS_ENV} to the file)")
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
        from pytorch_fid.inception import InceptionV3
    except ImportError as e:
        missing.append(f"the reference FID implementation pytorch-fid is not importable ({e}; "
                       f"pip install pytorch-fid; clean-fid resizes differently and is not compared)")
    if missing:
        pytest.skip("; ".join(missing))
    from ctsynth.evaluate.metrics import frechet_distance

    home = tmp_path / "torch"                       # a hub cache holding just these weights, for both
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / standard_weights_path().name).symlink_to(weights.resolve())
    monkeypatch.setenv("TORCH_HOME", str(home))     # CTSYNTH_OFFLINE=1 (conftest): no download
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(12, 1, 72, 72, generator=g), 9, 1)[:, 0]   # (12, 64, 64)
    x = ((smooth - smooth.mean()) * 8).clamp(-1, 1)           # greyscale images in model space [-1, 1]
    with torch.inference_mode():                               # pytorch-fid takes RGB in [0, 1]
        ref = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()(
            ((x + 1) / 2)[:, None].expand(-1, 3, -1, -1))[0].flatten(1).double()   # (12, 2048)
    ra, rb = ref[:6].numpy(), ref[6:].numpy()                  # one scipy sqrtm of 2048²: the slow part
    expected = float(calculate_frechet_distance(ra.mean(0), np.cov(ra, rowvar=False),
                                                rb.mean(0), np.cov(rb, rowvar=False)))
    tol = dict(rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    for ours in (InceptionFeatures("auto"), InceptionFeatures(weights)):
        feats = ours.features(x).double()
        torch.testing.assert_close(feats, ref, **tol, msg=f"{ours.flavour} standard={ours.standard}")
        assert frechet_distance(feats[:6], feats[6:]) == pytest.approx(expected, rel=1e-3)
