"""Paired training augmentation (train.augment): one geometric draw for image and condition,
the condition keeps its values, fills are air / background, torch's seed repeats it, and a
training with it runs, repeats and resumes bit for bit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_store, tiny_params
from ctsynth.core.config import params_from_dict
from ctsynth.core.errors import ConfigError
from ctsynth.core.labels import encode_condition
from ctsynth.data.augment import AUGMENTS, augment_labelled, build_augment
from ctsynth.train.train import run as train


def blobs(b: int = 8, size: int = 32, seed: int = 0) -> np.ndarray:
    """(B, S, S) structure-index masks of a few discs each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    masks = np.zeros((b, size, size), np.uint8)
    for i in range(b):
        for idx in range(1, 4):
            cy, cx, r = rng.uniform(0.25, 0.75, 2).tolist() + [rng.uniform(0.1, 0.2)]
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = idx
    return masks


def pair(encoding: str = "onehot", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cond (B, C, S, S) and an image that is structure 1 at +1 on -1 (air)."""
    masks = blobs(seed=seed)
    cond = torch.from_numpy(encode_condition(masks, ["Myo", "LA", "LV"], encoding))
    real = torch.from_numpy(np.where(masks == 1, 1.0, -1.0).astype(np.float32))[:, None]
    return cond, real


def draw(mode: str, cond, real, seed: int = 0):
    torch.manual_seed(seed)
    return build_augment(mode)(cond.clone(), real.clone())


def test_none_is_the_identity_and_unknown_modes_are_refused():
    cond, real = pair()
    c, r = build_augment("none")(cond, real)
    assert c is cond and r is real
    assert AUGMENTS == ("none", "affine", "affine+intensity", "classic")
    with pytest.raises(ConfigError, match="train.augment"):
        build_augment("flip")
    with pytest.raises(ConfigError, match="train.augment"):
        params_from_dict({"train": {"augment": "flip"}})
    assert params_from_dict({"train": {"augment": "affine+intensity"}}).train.augment == "affine+intensity"


def test_affine_warps_image_and_condition_with_the_same_draw():
    cond, real = pair()
    c, r = draw("affine", cond, real)
    assert c.shape == cond.shape and r.shape == real.shape
    changed = [not torch.equal(c[i], cond[i]) for i in range(len(c))]
    assert sum(changed) >= 4                                     # p = 0.8 of 8 slices
    moved = ((c[:, 0] > 0.5) != (cond[:, 0] > 0.5)).float().mean()
    disagree = ((r[:, 0] > 0) != (c[:, 0] > 0.5)).float().mean()  # image structure vs warped mask
    assert moved > 0.01 and disagree < moved / 10, (moved, disagree)   # (other draws: ~1.5 x moved)


@pytest.mark.parametrize("encoding", ["onehot", "index"])
def test_condition_keeps_its_values_image_its_range(encoding):
    cond, real = pair(encoding)
    for mode in ("affine", "affine+intensity", "classic"):
        c, r = draw(mode, cond, real)
        assert set(c.unique().tolist()) <= set(cond.unique().tolist())
        assert r.min() >= -1 and r.max() <= 1


def test_fill_is_air_for_the_image_and_background_for_the_condition():
    cond, real = torch.ones(8, 3, 32, 32), torch.ones(8, 1, 32, 32)
    c, r = draw("affine", cond, real)
    outside = r[:, 0] == -1                       # fully outside the warped field (bilinear)
    assert outside.any()
    assert (c.permute(1, 0, 2, 3)[:, outside] == 0).all()    # ... is background in every channel
    assert (c == 0).any() and set(c.unique().tolist()) == {0.0, 1.0}
    assert (r[c[:, :1] == 0] < 1).all()           # where the condition was filled, so was the image


def test_seeded_repeatability():
    cond, real = pair()
    for mode in ("affine", "affine+intensity", "classic"):
        a, b, other = draw(mode, cond, real, 1), draw(mode, cond, real, 1), draw(mode, cond, real, 2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], other[1])


def test_intensity_changes_the_image_not_the_condition():
    cond, real = pair()
    c_aff, r_aff = draw("affine", cond, real)
    c_int, r_int = draw("affine+intensity", cond, real)
    assert torch.equal(c_aff, c_int)              # same geometric draw comes first
    assert not torch.equal(r_aff, r_int)
    assert (r_int - r_aff).abs().max() < 0.3      # mild


def test_classic_warps_a_labelled_batch_alike_and_keeps_its_labels():
    """segmenter.augment classic: image and structure-index mask warped by one draw (elastic included),
    the mask keeps exactly its label values, the image its range; unknown modes name segmenter.augment."""
    masks = torch.from_numpy(blobs(b=16)).long()
    images = torch.where(masks > 0, 0.5, -1.0).float()               # structures bright on air
    torch.manual_seed(0)
    aug_images, aug_masks = augment_labelled(build_augment("classic", key="segmenter.augment"), images, masks)
    assert aug_images.shape == images.shape and aug_masks.dtype == torch.int64
    assert set(aug_masks.unique().tolist()) <= {0, 1, 2, 3} and aug_images.abs().max() <= 1
    moved = (aug_masks != masks).float().mean()
    disagree = ((aug_images > -0.25) != (aug_masks > 0)).float().mean()  # image structure vs warped mask
    assert moved > 0.02 and disagree < moved / 5, (moved, disagree)
    with pytest.raises(ConfigError, match="segmenter.augment"):
        build_augment("flip", key="segmenter.augment")
    assert params_from_dict({"segmenter": {"augment": "classic"}}).segmenter.augment == "classic"


def test_training_with_affine_runs_repeats_and_resumes(tmp_path):
    make_store(tmp_path / "processed")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}))

    def run(name, augment, **kw):
        p = tiny_params(train={"iterations": 5, "augment": augment}, train_run={"checkpoint_every": 2},
                        tracking={"enabled": False})
        out = tmp_path / name
        res = train(p, tmp_path / "processed", tmp_path / "split.json", out / "generator.pt", out / "ckpt",
                    out / "reports", run_file=out / "mlflow_run.json", **kw)
        return res, out

    def weights(out):
        return torch.load(out / "generator.pt", weights_only=True)["state_dict"]

    _, plain = run("plain", "none")
    _, a = run("a", "affine")
    _, b = run("b", "affine")
    first, part = run("part", "affine", stop_after=3)
    assert first.step == 3
    second, _ = run("part", "affine")
    assert second.step == 5
    wa, wb, wp, wn = weights(a), weights(b), weights(part), weights(plain)
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wp[k]) for k in wa)
    assert any(not torch.equal(wa[k], wn[k]) for k in wa if wa[k].is_floating_point())
