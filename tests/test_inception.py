"""evaluate.inception_weights: auto (standard FID weights via piq / torch hub), offline, failures."""
from __future__ import annotations

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
