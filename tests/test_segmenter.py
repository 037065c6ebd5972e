"""Segmenter (training, file format, Dice, FD_seg behaviour) and InceptionV3 loading."""
from __future__ import annotations

import json
import subprocess
import sys

import kornia
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, make_store, tiny_params
from ctsynth.core.errors import MetricUnavailable, ModelFileError
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.inception import INCEPTION_REASON, InceptionFeatures, inception_module
from ctsynth.evaluate.metrics import dice_scores, frechet_distance
from ctsynth.evaluate.segmenter import Segmenter, SegUNet, load_segmenter
from ctsynth.evaluate.segmenter import run as train_segmenter

SPLIT = {"seed": 0, "train": ["c1", "c2", "c3"], "val": ["c4"], "test": ["c5"]}
SEG = {"iterations": 60, "batch_size": 8, "width": 16, "lr": 0.003, "ema": 0.0}   # the plain last-step model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny store (5 cases × 8 slices, 32²), its split and a segmenter trained on c1..c3."""
    root = tmp_path_factory.mktemp("seg")
    store = make_store(root / "processed", cases=("c1", "c2", "c3", "c4", "c5"), slices_per_case=8)
    (root / "split.json").write_text(json.dumps(SPLIT))
    summary = train_segmenter(tiny_params(segmenter=SEG), store, root / "split.json", root / "seg.pt")
    return root, ProcessedStore(store), summary


def _test_slices(store):
    rows = store.rows_for_cases(["c5"])
    return torch.from_numpy(np.asarray(store.images[rows], np.float32)), np.asarray(store.masks[rows])


def test_segunet_shapes_any_size():
    net = SegUNet(width=4).eval()
    for size in (32, 40):                              # 40 is not divisible by 8
        logits, feats = net(torch.zeros(2, 1, size, size), with_features=True)
        assert logits.shape == (2, 8, size, size) and feats.shape == (2, net.feature_dim) == (2, 48)


def test_segmenter_file_is_weights_only_with_config(trained):
    root, store, summary = trained
    payload = torch.load(root / "seg.pt", weights_only=True)
    assert payload["format"] == "ctsynth-segmenter"
    assert payload["config"]["width"] == 16 and payload["config"]["image_size"] == 32
    assert payload["train"]["train_cases"] == SPLIT["train"] and summary["n_train_slices"] == 24
    assert sorted(payload["train"]["val_dice"]) == sorted(["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"])
    seg = load_segmenter(root / "seg.pt")
    x, _ = _test_slices(store)
    pred, feats = seg.run(x)
    assert pred.shape == (8, 32, 32) and feats.shape == (8, seg.dim) == (8, 192)
    assert torch.equal(seg.features(x), feats)       # eval mode: deterministic


def test_trained_segmenter_beats_untrained(trained):
    root, store, _ = trained
    x, masks = _test_slices(store)                    # a case never seen in training
    torch.manual_seed(0)
    untrained = Segmenter(SegUNet(width=16))
    labels = range(1, 8)
    before = np.mean(list(dice_scores(untrained.predict(x), masks, labels).values()))
    after = np.mean(list(dice_scores(load_segmenter(root / "seg.pt").predict(x), masks, labels).values()))
    assert after > before + 0.1, (before, after)


def test_segmenter_training_is_deterministic(tmp_path, tiny_store):
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "test": ["c4"]}))
    params = tiny_params(segmenter={"iterations": 3, "batch_size": 4, "width": 4})
    for name in ("a.pt", "b.pt"):
        train_segmenter(params, tiny_store, tmp_path / "split.json", tmp_path / name)
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fd_seg_grows_with_blur_and_noise(trained):
    root, store, _ = trained
    seg = load_segmenter(root / "seg.pt")
    rows = store.rows_for_cases(["c4", "c5"])
    x = torch.from_numpy(np.asarray(store.images[rows], np.float32))
    ref = seg.features(x)
    same = frechet_distance(ref, seg.features(x.clone()))
    # "≈ 0" up to piq's Newton–Schulz square root, whose error on small eigenvalues leaves a floor
    # of a few 1e-3 of the total feature variance when N < D (here 16 slices, 192-d features)
    assert 0 <= same < 1e-2 * float(torch.trace(torch.cov(ref.T.double())))
    g = torch.Generator().manual_seed(0)
    noisy = [frechet_distance(ref, seg.features((x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)))
             for s in (0.05, 0.15, 0.4)]
    blurred = [frechet_distance(ref, seg.features(
        kornia.filters.gaussian_blur2d(x[:, None], (9, 9), (s, s))[:, 0])) for s in (0.7, 1.5, 3.0)]
    assert same < 0.5 * min(noisy[0], blurred[0])
    assert 0 < noisy[0] < noisy[1] < noisy[2], noisy
    assert 0 < blurred[0] < blurred[1] < blurred[2], blurred


def test_load_segmenter_errors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_segmenter(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable"):
        load_segmenter(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a ctsynth segmenter"):
        load_segmenter(tmp_path / "other.pt")


def test_segmenter_stage_cli(tmp_path, tiny_store):
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "test": ["c4"]}))
    raw = {"preprocess": {"image_size": 32}, "model": {"gen_depth": 5, "disc_layers": 2},
           "segmenter": {"iterations": 2, "batch_size": 4, "width": 4}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, str(REPO / "stages" / "segmenter.py"), "--params", str(tmp_path / "params.yaml"),
           "--processed", str(tiny_store), "--split", str(tmp_path / "split.json"),
           "--out", str(tmp_path / "models" / "segmenter.pt")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_segmenter(tmp_path / "models" / "segmenter.pt").dim == 48
    cmd[cmd.index("--split") + 1] = str(tmp_path / "nope.json")
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "split file not found" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------ Inception

def test_inception_missing_weights_is_reported_not_estimated(tmp_path):
    with pytest.raises(MetricUnavailable) as err:
        InceptionFeatures(None)
    assert str(err.value) == INCEPTION_REASON and "fid_inception not computed" in str(err.value)
    with pytest.raises(MetricUnavailable, match="not found"):
        InceptionFeatures(tmp_path / "inception.pth")
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelFileError):
        InceptionFeatures(tmp_path / "bad.pth")


@pytest.mark.parametrize("flavour", ["torchvision", "pt_inception"])
def test_inception_loads_a_local_state_dict(tmp_path, flavour):
    torch.manual_seed(0)
    net = inception_module(flavour)
    for m in net.modules():                   # cheap init: BN defaults + small random convs
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    inc = InceptionFeatures(tmp_path / "inception.pth")
    assert inc.flavour == flavour
    feats = inc.features(torch.rand(2, 40, 40) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_weight_average_is_the_model_returned(tiny_store):
    """segmenter.ema > 0: the model is the moving average of the weights, not the last step's."""
    from ctsynth.evaluate.segmenter import train_segmenter as fit

    store = ProcessedStore(tiny_store)
    pool = [(store, store.rows_for_cases(["c1", "c2"]))]
    last, _ = fit(tiny_params(segmenter={"iterations": 6, "ema": 0.0}).segmenter, 0, pool)
    avg, _ = fit(tiny_params(segmenter={"iterations": 6, "ema": 0.5}).segmenter, 0, pool)
    again, _ = fit(tiny_params(segmenter={"iterations": 6, "ema": 0.5}).segmenter, 0, pool)
    w_last, w_avg, w_again = last.state_dict(), avg.state_dict(), again.state_dict()
    assert w_last.keys() == w_avg.keys()
    assert any(not torch.equal(w_last[k], w_avg[k]) for k in w_last if w_last[k].is_floating_point())
    assert all(torch.equal(w_avg[k], w_again[k]) for k in w_avg)
