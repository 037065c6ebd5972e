"""Segmenter (training, file format, Dice, FD_seg behaviour) and InceptionV3 loading."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import kornia
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, make_store, tiny_params
from ctsynth.core.errors import InputError, MetricUnavailable, ModelFileError
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.inception import INCEPTION_REASON, InceptionFeatures, inception_module
from ctsynth.evaluate.metrics import dice_scores, frechet_distance
from ctsynth.segmenter.segmenter import Segmenter, SegUNet, check_segmenter_params, load_segmenter, segmenter_seed
from ctsynth.segmenter.segmenter import run as train_segmenter

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


@pytest.mark.parametrize("augment", ["none", "classic"])
def test_segmenter_training_is_deterministic(tmp_path, tiny_store, augment):
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "test": ["c4"]}))
    params = tiny_params(segmenter={"iterations": 3, "batch_size": 4, "width": 4, "augment": augment})
    for name in ("a.pt", "b.pt"):
        train_segmenter(params, tiny_store, tmp_path / "split.json", tmp_path / name)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["train"]["augment"] == augment
    if augment == "classic":                    # the augmented batches train another model than plain ones
        train_segmenter(tiny_params(segmenter={"iterations": 3, "batch_size": 4, "width": 4}), tiny_store,
                        tmp_path / "split.json", tmp_path / "plain.pt")
        plain = torch.load(tmp_path / "plain.pt", weights_only=True)["state_dict"]
        assert any(not torch.equal(a["state_dict"][k], plain[k]) for k in plain if plain[k].is_floating_point())


def test_fd_seg_grows_with_blur_and_noise(trained):
    root, store, _ = trained
    seg = load_segmenter(root / "seg.pt")
    rows = store.rows_for_cases(["c4", "c5"])
    x = torch.from_numpy(np.asarray(store.images[rows], np.float32))
    ref = seg.features(x)
    same = frechet_distance(ref, seg.features(x.clone()))
    # the exact float64 FD of a set with itself is 0 up to rounding also when N < D (here 16 slices,
    # 192-d features): measured 2.7e-15 = 9e-16 × trace (piq's Newton–Schulz root left ~1e-3 × trace)
    assert 0 <= same < 1e-9 * float(torch.trace(torch.cov(ref.T.double())))
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
    seg = load_segmenter(tmp_path / "models" / "segmenter.pt")
    assert seg.dim == 48 and seg.train["runtime"]["torch_threads"] == torch.get_num_threads()
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
    from ctsynth.segmenter.segmenter import train_segmenter as fit

    store = ProcessedStore(tiny_store)
    pool = [(store, store.rows_for_cases(["c1", "c2"]))]
    last, _ = fit(tiny_params(segmenter={"iterations": 6, "ema": 0.0}).segmenter, 0, pool)
    avg, _ = fit(tiny_params(segmenter={"iterations": 6, "ema": 0.5}).segmenter, 0, pool)
    again, _ = fit(tiny_params(segmenter={"iterations": 6, "ema": 0.5}).segmenter, 0, pool)
    w_last, w_avg, w_again = last.state_dict(), avg.state_dict(), again.state_dict()
    assert w_last.keys() == w_avg.keys()
    assert any(not torch.equal(w_last[k], w_avg[k]) for k in w_last if w_last[k].is_floating_point())
    assert all(torch.equal(w_avg[k], w_again[k]) for k in w_avg)


def test_weight_average_is_the_exact_ema_of_the_step_weights(tiny_store):
    """segmenter.ema = d: the model returned after 3 steps is e₃ of e₁ = w₁, e_t = d·e_{t−1} + (1 − d)·w_t
    over the weights w_t after step t (parameters and BatchNorm statistics), computed here in float64
    from the last-step models of 1, 2 and 3-step trainings (the same seeded trajectory). d = 0.7, not
    0.5, so swapping d and 1 − d, starting from the initial weights or leaving the BN statistics
    unaveraged all fail (each off by > 1e-3 somewhere; float32 rounding: < 1e-6)."""
    from ctsynth.segmenter.segmenter import train_segmenter as fit

    store = ProcessedStore(tiny_store)
    pool = [(store, store.rows_for_cases(["c1", "c2"]))]
    steps = [fit(tiny_params(segmenter={"iterations": t, "ema": 0.0}).segmenter, 0, pool)[0].state_dict()
             for t in (1, 2, 3)]
    got = fit(tiny_params(segmenter={"iterations": 3, "ema": 0.7}).segmenter, 0, pool)[0].state_dict()
    floats = [k for k in got if got[k].is_floating_point()]          # num_batches_tracked: a counter
    assert any("running_mean" in k for k in floats) and len(floats) > 20
    for k in floats:
        ema = steps[0][k].double()
        for w in steps[1:]:
            ema = 0.7 * ema + 0.3 * w[k].double()
        torch.testing.assert_close(got[k].double(), ema, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(got[k], steps[2][k], rtol=1e-3, atol=1e-3) for k in floats)


def test_reused_segmenter_must_match_the_segmenter_params_and_seed(trained):
    """The utility stage reuses models/segmenter.pt as its real-only model: a file trained with other
    segmenter.* values or another seed is refused, naming the file, every differing key with both
    values, and the fix."""
    root, _, _ = trained
    path = root / "seg.pt"
    seg = load_segmenter(path)
    as_trained = tiny_params(segmenter=SEG)
    check_segmenter_params(seg, as_trained, path)                                    # same params: accepted
    wanted = dataclasses.replace(tiny_params(segmenter={**SEG, "iterations": 61, "lr": 0.001}),
                                 seed=as_trained.seed + 1)
    with pytest.raises(InputError) as err:
        check_segmenter_params(seg, wanted, path)
    problems = err.value.problems
    assert all(str(path) in p for p in problems) and "dvc repro segmenter" in problems[-1]
    text = "\n".join(problems)
    assert "segmenter.iterations = 60, the params want 61" in text
    assert "segmenter.lr = 0.003, the params want 0.001" in text
    assert f"seed train_segmenter was given = {as_trained.seed}, the params want {as_trained.seed + 1}" in text
    assert "width" not in text and "batch_size" not in text and len(problems) == 4


def test_segmenter_seed_is_its_own_when_set_else_the_top_level_seed():
    assert segmenter_seed(SimpleNamespace(seed=42, segmenter=SimpleNamespace(seed=None))) == 42
    assert segmenter_seed(SimpleNamespace(seed=42, segmenter=SimpleNamespace(seed=5))) == 5
    assert segmenter_seed(SimpleNamespace(seed=42, segmenter=SimpleNamespace())) == 42   # no segmenter.seed key


def test_a_batch_share_draws_that_fraction_from_the_second_pool():
    from ctsynth.segmenter.segmenter import _share_picks

    rng = np.random.default_rng(0)
    picks = _share_picks(rng, [10, 3], 16, 0.25)                 # 4 of 16 from the 3 synthetic slices
    assert picks.size == 16 and (picks >= 10).sum() == 4 and picks.max() < 13 and picks.min() >= 0
    assert (_share_picks(rng, [10, 3], 16, 0.0) < 10).all() and (_share_picks(rng, [10, 3], 16, 1.0) >= 10).all()


def test_share_and_init_change_the_training_and_bad_shares_are_refused(tiny_store):
    """A share trains on other batches than drawing uniformly; init starts from given weights (a
    zero-step continuation returns them); a share needs two pools and a value in [0, 1]."""
    from ctsynth.core.errors import ConfigError
    from ctsynth.segmenter.segmenter import train_segmenter as fit

    store = ProcessedStore(tiny_store)
    pools = [(store, store.rows_for_cases(["c1"])), (store, store.rows_for_cases(["c2"]))]
    cfg = tiny_params(segmenter={"iterations": 3, "ema": 0.0}).segmenter
    uniform, _ = fit(cfg, 0, pools)
    shared, _ = fit(cfg, 0, pools, share=0.75)
    again, _ = fit(cfg, 0, pools, share=0.75)
    w_u, w_s, w_a = uniform.state_dict(), shared.state_dict(), again.state_dict()
    assert any(not torch.equal(w_u[k], w_s[k]) for k in w_u if w_u[k].is_floating_point())
    assert all(torch.equal(w_s[k], w_a[k]) for k in w_s)                      # seeded
    start, _ = fit(dataclasses.replace(cfg, iterations=1), 1, pools[:1], init=shared)
    fresh, _ = fit(dataclasses.replace(cfg, iterations=1), 1, pools[:1])
    assert any(not torch.equal(start.state_dict()[k], fresh.state_dict()[k]) for k in w_s
               if w_s[k].is_floating_point())                                  # not a fresh network
    for bad in ({"share": 1.5}, {"share": 0.5, "pools": pools[:1]}):
        with pytest.raises(ConfigError, match="a batch share needs exactly two pools"):
            fit(cfg, 0, bad.get("pools", pools), share=bad["share"])


def test_bf16_training_keeps_fp32_weights_is_repeatable_and_is_recorded(tmp_path, tiny_store):
    """segmenter.precision bf16: the forward pass under autocast (another model than fp32's), weights
    still fp32, two runs bit-equal; the file records the asked and the resolved precision."""
    from ctsynth.core.accel import resolve_precision
    from ctsynth.segmenter.segmenter import train_segmenter as fit

    store = ProcessedStore(tiny_store)
    pool = [(store, store.rows_for_cases(["c1", "c2"]))]
    cfg = {"iterations": 4, "batch_size": 4, "width": 4, "ema": 0.0}
    fp32, _ = fit(tiny_params(segmenter={**cfg, "precision": "fp32"}).segmenter, 0, pool)
    bf16, loss = fit(tiny_params(segmenter={**cfg, "precision": "bf16"}).segmenter, 0, pool)
    again, _ = fit(tiny_params(segmenter={**cfg, "precision": "bf16"}).segmenter, 0, pool)
    w32, w16, w16b = fp32.state_dict(), bf16.state_dict(), again.state_dict()
    assert np.isfinite(loss)
    assert all(v.dtype == w32[k].dtype for k, v in w16.items())
    assert all(torch.equal(w16[k], w16b[k]) for k in w16)
    assert any(not torch.equal(w32[k], w16[k]) for k in w32 if w32[k].is_floating_point())
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "test": ["c4"]}))
    summary = train_segmenter(tiny_params(segmenter={**cfg, "precision": "auto"}), tiny_store,
                              tmp_path / "split.json", tmp_path / "seg.pt")
    assert summary["precision"] == "auto"
    assert summary["precision_used"] == resolve_precision("auto", torch.device("cpu"))
