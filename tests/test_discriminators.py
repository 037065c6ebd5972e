"""Discriminator options. The z-aware discriminator (model.disc_slices): slabs of consecutive slices
in the data, one augmentation draw per slab, the discriminator judging a slab's slices together,
the config's checks, and a training that runs, repeats and resumes bit for bit. The multi-scale
discriminator (model.disc_scales): known answers per scale, receptive field, config, training."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_store, tiny_params
from ctsynth.core.config import params_from_dict
from ctsynth.core.errors import ConfigError
from ctsynth.data.augment import _from_slabs, _to_slabs, build_batch_transform
from ctsynth.data.store import ProcessedStore, SlabDataset, SliceDataset, train_batches
from ctsynth.train.networks import (
    MultiScaleDiscriminator,
    PatchDiscriminator,
    SlabDiscriminator,
    build_discriminator,
    receptive_field,
)
from ctsynth.train.train import run as train

SPLIT = {"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}


# ------------------------------------------------------------------------------------ network

def test_slab_discriminator_judges_the_slabs_slices_as_the_channels_of_one_input():
    """Known answer: a slab discriminator's scores are its PatchGAN's on concat(images, conditions) of
    each slab; the order of a slab's slices matters (it sees them together), the order of slabs
    does not leak between them."""
    torch.manual_seed(0)
    d = SlabDiscriminator(1 + 3, 2, ndf=4, layers=2).eval()
    image, cond = torch.randn(6, 1, 16, 16), torch.rand(6, 3, 16, 16)
    scores = d(image, cond)
    assert scores.shape == (3, 1, 4, 4)
    slab = torch.cat([image.reshape(3, 2, 16, 16), cond.reshape(3, 6, 16, 16)], dim=1)
    assert torch.allclose(scores, d.patch.net(slab))
    swapped = torch.tensor([1, 0, 2, 3, 4, 5])                  # the first slab's two slices swapped
    again = d(image[swapped], cond[swapped])
    assert not torch.allclose(again[0], scores[0]) and torch.allclose(again[1:], scores[1:])
    _, feats = d(image, cond, features=True)
    assert [f.shape[0] for f in feats] == [3, 3]                # block features per slab
    with pytest.raises(ValueError, match="not whole slabs of 2"):
        d(image[:5], cond[:5])


def test_build_discriminator_keeps_pix2pix_at_one_slice_and_the_receptive_field():
    one = build_discriminator({"ndf": 4, "disc_layers": 2}, 7)
    assert type(one) is PatchDiscriminator and one.net[0].in_channels == 8
    torch.manual_seed(3)
    a = build_discriminator({"ndf": 4, "disc_layers": 2, "disc_slices": 1}, 7)
    torch.manual_seed(3)
    b = PatchDiscriminator(8, ndf=4, layers=2)
    from ctsynth.train.networks import init_weights
    init_weights(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    three = build_discriminator({"ndf": 4, "disc_layers": 2, "disc_slices": 3}, 7)
    assert isinstance(three, SlabDiscriminator) and three.patch.net[0].in_channels == 3 * 8
    assert receptive_field(three) == receptive_field(one) == 22
    with pytest.raises(ValueError, match=">= 2 slices"):
        SlabDiscriminator(8, 1)


def test_channels_last_slabs_score_as_contiguous_ones():
    torch.manual_seed(0)
    d = SlabDiscriminator(1 + 3, 2, ndf=4, layers=2).eval()
    image, cond = torch.randn(4, 1, 16, 16), torch.rand(4, 3, 16, 16)
    ref = d(image, cond)
    d_cl = d.to(memory_format=torch.channels_last)
    out = d_cl(image.contiguous(memory_format=torch.channels_last), cond.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-6)


# --------------------------------------------------------------------------------------- data

def test_slabs_are_runs_of_consecutive_stored_slices_of_one_case(tmp_path):
    root = make_store(tmp_path / "p", cases=("c1", "c2"), slices_per_case=5)
    table = pd.read_csv(root / "slices.csv")
    table.loc[2, "z"] = 7                                      # c1 stores z 0 1 7 3 4: a gap after 1
    table.to_csv(root / "slices.csv", index=False)
    store = ProcessedStore(root)
    ds = SliceDataset(store, store.rows_for_cases(["c1", "c2"]))
    slabs = SlabDataset(ds, 2)
    pairs = [tuple(map(int, r)) for r in slabs.index]
    # c1: (z0, z1), (z3, z4); c2 (rows 5-9, z 0..4): four pairs; never across cases or the gap
    assert pairs == [(0, 1), (3, 4), (5, 6), (6, 7), (7, 8), (8, 9)]
    cond, image = slabs[1]
    assert cond.shape == (2, 7, 32, 32) and image.shape == (2, 1, 32, 32)
    assert torch.equal(image[1], ds[4][1]) and torch.equal(cond[0], ds[3][0])
    assert [tuple(map(int, r)) for r in SlabDataset(ds, 3).index] == [(5, 6, 7), (6, 7, 8), (7, 8, 9)]   # c1: none


def test_batches_of_slabs_come_flat_with_each_slab_consecutive(tmp_path):
    from torch.utils.data import DistributedSampler

    store = ProcessedStore(make_store(tmp_path / "p", cases=("c1",), slices_per_case=6))
    ds = SliceDataset(store, store.rows_for_cases(["c1"]))
    slabs = SlabDataset(ds, 2)
    sampler = DistributedSampler(slabs, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    cond, image = next(train_batches(slabs, sampler, 2, 0))
    assert cond.shape == (4, 7, 32, 32) and image.shape == (4, 1, 32, 32)
    first = int(list(sampler)[0])
    a, b = slabs.index[first]
    assert torch.equal(image[0], ds[int(a)][1]) and torch.equal(image[1], ds[int(b)][1])


# ------------------------------------------------------------------------------- augmentation

def test_slab_layout_round_trips_and_keeps_one_constant_plane_per_slab():
    cond = torch.rand(6, 4, 8, 8)
    cond[:, 3] = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.3, 0.3]).view(-1, 1, 1)    # each slab's contrast plane
    real = torch.rand(6, 1, 8, 8)
    slab_cond, slab_real = _to_slabs(cond, real, 2, 1)
    assert slab_cond.shape == (3, 2 * 3 + 1, 8, 8) and slab_real.shape == (3, 2, 8, 8)
    assert torch.equal(slab_cond[1, 3:6], cond[3, :3])
    assert torch.equal(slab_cond[:, 6, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    back_cond, back_real = _from_slabs(slab_cond, slab_real, 2, 1)
    assert torch.equal(back_cond, cond) and torch.equal(back_real, real)


@pytest.mark.parametrize("k", [1, 2])
def test_a_slab_is_warped_by_one_draw(k):
    """Known answer: identical slices stay identical through the affine augmentation when they are
    one slab (one draw); as separate slices (k = 1) they get draws of their own and differ."""
    p = tiny_params(model={"disc_slices": k}, train={"augment": "affine", "anatomy_drop": 0.0})
    transform = build_batch_transform(p, 0, ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"])
    yy = torch.linspace(-1, 1, 32)
    img = (yy[:, None] * yy[None, :] + 0.3 * yy[:, None]).expand(1, 32, 32)   # a pattern any warp moves
    mask = (img > 0.2).float().expand(7, 32, 32)
    torch.manual_seed(5)
    cond, real, noise = transform(torch.stack([mask] * 16), torch.stack([img] * 16), 0)
    assert noise is None and cond.shape == (16, 7, 32, 32) and real.shape == (16, 1, 32, 32)
    pairs = [torch.equal(real[i], real[i + 1]) and torch.equal(cond[i], cond[i + 1]) for i in range(0, 16, 2)]
    distinct = len({real[i].sum().item() for i in range(0, 16, 2)})    # slabs (or slices) with draws of their own
    assert all(pairs) if k == 2 else sum(pairs) <= 1                   # k = 1: both unwarped (p 0.2²) at most once
    assert distinct >= 4                                               # not one draw for the whole batch


def test_anatomy_drop_blanks_whole_slabs():
    p = tiny_params(model={"disc_slices": 2, "anatomy": True}, train={"augment": "none", "anatomy_drop": 0.5})
    transform = build_batch_transform(p, 0, ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"])
    kept = []
    for step in range(10):
        cond, _, _ = transform(torch.ones(8, 10, 8, 8), torch.zeros(8, 1, 8, 8), step)
        kept += [cond[:, 7:].amax((1, 2, 3)).tolist()]
    kept = np.array(kept)                                      # (steps, slices): 1 kept, 0 blanked
    assert np.array_equal(kept[:, 0::2], kept[:, 1::2])        # a slab's slices share the draw
    assert 0 < kept.mean() < 1 and (cond[:, :7] == 1).all()    # some dropped, some kept; masks untouched


# ------------------------------------------------------------------------------------- config

def test_config_refuses_bad_slab_settings_together():
    with pytest.raises(ConfigError) as err:
        params_from_dict({"model": {"disc_slices": 5}})
    assert "model.disc_slices: consecutive slices the discriminator judges together, 1 (pix2pix) to 4" in str(err.value)
    with pytest.raises(ConfigError) as err:
        params_from_dict({"model": {"disc_slices": 3, "noise": "nps"}, "train": {"batch_size": 8}})
    text = str(err.value)
    assert "train.batch_size 8 must be whole slabs" in text and "model.noise nps" in text


# ----------------------------------------------------------------------------------- training

@pytest.fixture
def ws(tmp_path):
    make_store(tmp_path / "processed")
    (tmp_path / "split.json").write_text(json.dumps(SPLIT))
    return tmp_path


def _train(ws, name: str, model: dict | None = None, **kw):
    p = tiny_params(model=model or {"disc_slices": 2},
                    train={"iterations": 5, "batch_size": 4, "augment": "affine"},
                    train_run={"checkpoint_every": 2, "log_every": 1}, tracking={"enabled": False})
    out = ws / name
    result = train(p, ws / "processed", ws / "split.json", out / "generator.pt", out / "ckpt", out / "reports",
                   run_file=out / "run.json", **kw)
    return result, out


def test_training_with_slabs_runs_repeats_and_resumes_bit_for_bit(ws, caplog):
    with caplog.at_level("INFO", logger="ctsynth.train.train"):
        full, a = _train(ws, "a")
    assert full.step == 5 and "judging 2 consecutive slices together" in caplog.text
    ckpt = torch.load(sorted((a / "ckpt").glob("*/step_*.pt"))[-1], weights_only=True)
    assert "patch.net.0.weight" in ckpt["D"] and ckpt["D"]["patch.net.0.weight"].shape[1] == 2 * 8
    part, b = _train(ws, "b", stop_after=3)
    assert part.step == 3
    _train(ws, "b")
    ga = torch.load(a / "generator.pt", weights_only=True)["state_dict"]
    gb = torch.load(b / "generator.pt", weights_only=True)["state_dict"]
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert (a / "reports/losses.csv").read_bytes() == (b / "reports/losses.csv").read_bytes()


def test_too_few_slabs_or_broken_slabs_are_refused_naming_the_split(tmp_path):
    from ctsynth.core.errors import InputError
    from ctsynth.data.store import slabs_of

    root = make_store(tmp_path / "p", cases=("c1",), slices_per_case=3)
    table = pd.read_csv(root / "slices.csv")
    table["z"] = [0, 2, 4]                                     # no two stored slices are neighbours
    table.to_csv(root / "slices.csv", index=False)
    store = ProcessedStore(root)
    ds = SliceDataset(store, store.rows_for_cases(["c1"]))
    assert slabs_of(ds, 1, 4, tmp_path / "split.json") is ds
    with pytest.raises(InputError, match=r"split\.json: 0 runs of 2 consecutive stored slices"):
        slabs_of(ds, 2, 4, tmp_path / "split.json")
    with pytest.raises(ConfigError, match="3 slices per process .* not whole slabs"):
        slabs_of(ds, 2, 3, tmp_path / "split.json")


# -------------------------------------------------------------------------------- multi-scale

def test_multi_scale_scores_are_each_scales_on_the_finest_grid():
    """Known answer: channel 0 is the first discriminator on the slice, channel 1 the second on the
    slice average-pooled 3x3 / 2 (padding not counted), each of its scores repeated 2x2; the block
    features are the first scale's then the second's."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    d = build_discriminator({"ndf": 4, "disc_layers": 2, "disc_scales": 2}, 3).eval()
    assert isinstance(d, MultiScaleDiscriminator) and len(d.scales) == 2
    image, cond = torch.randn(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    scores, feats = d(image, cond, features=True)
    assert scores.shape == (2, 2, 8, 8) and len(feats) == 4
    assert torch.allclose(scores[:, :1], d.scales[0](image, cond))
    pool = lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False)          # noqa: E731
    coarse = d.scales[1](pool(image), pool(cond))                               # (2, 1, 4, 4)
    assert torch.allclose(scores[:, 1:], coarse.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert feats[2].shape[-1] == feats[0].shape[-1] // 2
    assert not torch.allclose(scores[:, 0], scores[:, 1])                       # two discriminators, two answers


def test_multi_scale_receptive_field_and_slabs_compose():
    one = build_discriminator({"ndf": 4, "disc_layers": 2}, 3)
    two = build_discriminator({"ndf": 4, "disc_layers": 2, "disc_scales": 2}, 3)
    assert receptive_field(one) == 22 and receptive_field(two) == 1 + 2 + 2 * 21 == 45   # pool then the convs at /2
    assert receptive_field({"ndf": 4, "disc_layers": 2, "disc_scales": 2}) == 45
    both = build_discriminator({"ndf": 4, "disc_layers": 2, "disc_scales": 2, "disc_slices": 2}, 3)
    assert all(isinstance(s, SlabDiscriminator) for s in both.scales)
    assert both(torch.randn(4, 1, 16, 16), torch.rand(4, 3, 16, 16)).shape == (2, 2, 4, 4)
    with pytest.raises(ValueError, match=">= 2 scales"):
        MultiScaleDiscriminator([one])


def test_config_refuses_scales_the_slice_cannot_hold():
    with pytest.raises(ConfigError) as err:
        params_from_dict({"model": {"disc_scales": 4}})
    assert "model.disc_scales: discriminators at 1, 1/2, 1/4 of the slice size, 1 (pix2pix) to 3" in str(err.value)
    with pytest.raises(ConfigError, match=r"by 2\^\(model.disc_layers \+ model.disc_scales - 1\) = 32"):
        params_from_dict({"preprocess": {"image_size": 16}, "model": {"gen_depth": 4, "disc_layers": 3,
                                                                      "disc_scales": 3}})


def test_training_with_two_scales_runs_and_resumes_bit_for_bit(ws, caplog):
    model = {"disc_scales": 2}
    with caplog.at_level("INFO", logger="ctsynth.train.train"):
        _, a = _train(ws, "a", model)
    assert "patches at the finest of 2 scales, receptive field up to 45 px" in caplog.text
    ckpt = torch.load(sorted((a / "ckpt").glob("*/step_*.pt"))[-1], weights_only=True)
    assert {k.split(".")[1] for k in ckpt["D"] if k.startswith("scales.")} == {"0", "1"}
    _train(ws, "b", model, stop_after=3)
    _train(ws, "b", model)
    ga = torch.load(a / "generator.pt", weights_only=True)["state_dict"]
    gb = torch.load(ws / "b" / "generator.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
