"""The contrast control (model.contrast_control): levels measured from the real images, the
condition plane, augmentation leaving it whole, the model file's range, refusal outside it, and
generate / synthesize drawing at the level they were given, measured or drew."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_store, tiny_params
from ctsynth.core.config import params_from_dict
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.data import contrast
from ctsynth.data.augment import build_augment
from ctsynth.data.preprocess import hu_to_unit
from ctsynth.data.store import ProcessedStore, condition_batch, condition_width
from ctsynth.synth import generate as gen
from ctsynth.synth import synthesize as syn
from ctsynth.synth.inference import MaskToCT, load_model
from ctsynth.train.networks import build_generator, save_generator
from ctsynth.train.train import run as train
from test_generate import SIZE, WINDOW, make_world, save_tiny_model

LEVELS = {"c1": 250.0, "c2": 420.0, "c3": 330.0, "c4": 600.0}


def store_with_levels(root, levels=LEVELS):
    """A tiny store whose blood pools (LA..PA) sit at each case's level and whose myocardium sits
    at 100 HU: the level is known exactly (up to float16)."""
    make_store(root, cases=tuple(levels))
    images = np.load(root / "images.npy").astype(np.float32)
    masks = np.load(root / "masks.npy")
    cases = pd.read_csv(root / "slices.csv").case.to_numpy()
    for i in range(len(images)):
        images[i][np.isin(masks[i], [2, 3, 4, 5, 6, 7])] = hu_to_unit(levels[cases[i]], WINDOW)
        images[i][masks[i] == 1] = hu_to_unit(100.0, WINDOW)
    np.save(root / "images.npy", images.astype(np.float16))
    return ProcessedStore(root)


def test_level_is_the_median_hu_of_the_blood_pools(tmp_path):
    store = store_with_levels(tmp_path / "processed")
    found = contrast.case_levels(store, list(LEVELS))
    assert found == pytest.approx(LEVELS, abs=1.0)                         # float16 store: < 1 HU
    assert contrast.level_structures(["Myo", "LV", "Ao"]) == ["LV", "Ao"]
    assert contrast.level_structures(["Myo"]) == ["Myo"]                   # no blood pool: what there is
    rows = store.rows_for_cases(["c2", "c4"])
    assert set(contrast.row_levels(store, rows, found).round()) == {420.0, 600.0}


def test_record_check_clip_and_draw():
    rec = contrast.record({"a": 300.0, "b": 400.0, "c": float("nan")}, ["LV"])
    assert rec["range_hu"] == [300.0, 400.0] and rec["mean_hu"] == 350.0 and "c" not in rec["train_levels_hu"]
    assert contrast.check(320.0, rec) == 320.0
    with pytest.raises(InputError, match=r"--contrast 450 HU: outside .* \(300 to 400 HU"):
        contrast.check(450.0, rec, "--contrast")
    assert contrast.clip(450.0, rec) == (400.0, True) and contrast.clip(350.0, rec) == (350.0, False)
    assert contrast.clip(float("nan"), rec) == (350.0, True)
    assert contrast.clip_levels({"z": 450.0, "y": 320.0, "x": float("nan")}, rec) == (
        {"z": 400.0, "y": 320.0, "x": 350.0}, ["x", "z"])
    draws = [contrast.draw(np.random.default_rng([1, i, 1]), rec) for i in range(200)]
    assert min(draws) >= 300 and max(draws) <= 400 and np.std(draws) > 20
    assert sum(d in (300.0, 400.0) for d in draws) == 0                  # truncated, not clipped
    assert draws == [contrast.draw(np.random.default_rng([1, i, 1]), rec) for i in range(200)]
    with pytest.raises(InputError, match="no training case has any of"):
        contrast.record({"a": float("nan")}, ["LV"])


def test_plane_is_the_standardized_level_and_old_model_files_keep_theirs():
    """New records say ``plane: standardized``: the plane is (level - training mean) / sd, so the
    training levels span about +-1, as the mask channels' 0 / 1 do; a record written before the key
    existed keeps the image-scale plane it was trained with (hu_to_unit)."""
    rec = contrast.record({"a": 300.0, "b": 400.0, "c": 350.0}, ["LV"])
    assert rec["plane"] == "standardized" and rec["sd_hu"] == 50.0
    z = contrast.planes([300.0, 350.0, 400.0, 425.0], rec, WINDOW)
    assert z.dtype == np.float32 and z.tolist() == [-1.0, 0.0, 1.0, 1.5]
    old = {k: v for k, v in rec.items() if k != "plane"}
    assert np.array_equal(contrast.planes([300.0, 400.0], old, WINDOW), hu_to_unit(np.float32([300.0, 400.0]), WINDOW))
    one = contrast.record({"a": 300.0}, ["LV"])                          # one training level: sd 0
    assert contrast.planes([300.0], one, WINDOW).tolist() == [0.0]


def test_condition_plane_and_augmentation_keep_the_level_whole():
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[:, 4:12, 4:12] = 3
    cond = condition_batch(masks, ["LV", "Ao"], "onehot", np.array([0.1, 0.2, 0.3, 0.4]))
    assert cond.shape == (4, condition_width(["LV", "Ao"], "onehot", 0, True), 16, 16) == (4, 3, 16, 16)
    assert torch.equal(cond[:, 2], torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1).expand(4, 16, 16))
    torch.manual_seed(0)
    warped, _ = build_augment("affine", constant_channels=1)(cond.clone(), torch.zeros(4, 1, 16, 16))
    assert torch.equal(warped[:, 2], cond[:, 2])                           # the level plane: untouched
    assert not torch.equal(warped[:, 0], cond[:, 0])                       # the masks: warped
    torch.manual_seed(0)
    whole, _ = build_augment("affine")(cond.clone(), torch.zeros(4, 1, 16, 16))
    assert (whole[:, 2] == 0).any()                                        # what a warp would do to it


def test_config_refuses_intensity_jitter_with_the_control():
    with pytest.raises(ConfigError, match="contrast_control with train.augment affine\\+intensity"):
        params_from_dict({"model": {"contrast_control": True}, "train": {"augment": "affine+intensity"}})


def test_training_records_the_range_and_the_model_refuses_levels_outside(tmp_path):
    store_with_levels(tmp_path / "processed")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}))
    p = tiny_params(model={"contrast_control": True}, train={"iterations": 2}, tracking={"enabled": False})
    out = tmp_path / "run"
    train(p, tmp_path / "processed", tmp_path / "split.json", out / "g.pt", out / "ckpt", out / "reports",
          run_file=out / "run.json")
    model, meta = load_model(out / "g.pt")
    rec = meta["contrast"]
    assert meta["in_channels"] == 8 and rec["range_hu"] == pytest.approx([250, 420], abs=1)
    assert set(rec["train_levels_hu"]) == {"c1", "c2"}                     # training cases only
    synth = MaskToCT(model, meta)
    assert synth.level == pytest.approx(335, abs=1)                        # default: the training mean
    masks = np.asarray(ProcessedStore(tmp_path / "processed").masks[:3])
    low, high = synth.unit(masks, np.full(3, 260.0)), synth.unit(masks, np.full(3, 410.0))
    assert not np.array_equal(low, high)                                   # the plane reaches the output
    assert rec["plane"] == "standardized"
    rows = ProcessedStore(tmp_path / "processed").rows_for_cases(["c1", "c2"])
    seen = contrast.measured_planes(ProcessedStore(tmp_path / "processed"), rows, rec)
    assert sorted(set(seen.round(3).tolist())) == pytest.approx([-0.707, 0.707], abs=0.01)   # two levels, sd ddof 1
    with pytest.raises(InputError, match=r"contrast 600 HU: outside the contrast levels .* \(250 to 419\.9\d HU"):
        MaskToCT(model, meta, contrast_hu=600.0)
    plain, plain_meta = load_model(save_tiny_model(tmp_path / "plain.pt"))
    with pytest.raises(InputError, match="this model has no contrast control"):
        MaskToCT(plain, plain_meta, contrast_hu=300.0)


def save_contrast_model(path, levels=(280.0, 320.0)):
    cfg = tiny_params(model={"contrast_control": True}).model
    g = build_generator(cfg, 8)
    rec = contrast.record(dict(zip(("p3", "p4"), levels)), ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"])
    save_generator(path, g, cfg, 8, {
        "image_size": SIZE, "hu_window": WINDOW, "structures": ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"],
        "label_map": {"205": "Myo", "420": "LA", "500": "LV", "550": "RA", "600": "RV", "820": "Ao", "850": "PA"},
        "encoding": "onehot", "contrast": rec})
    return path


def test_generate_draws_each_case_at_its_measured_level_clipped_into_range(tmp_path):
    w = make_world(tmp_path)                                               # blood at 300 HU in every case
    save_contrast_model(w["model"], levels=(320.0, 380.0))
    gen.run(tiny_params(model={"contrast_control": True}, generate={"grid_slices": 2}), w["model"],
            w["processed"], w["split"], w["interim"], w["out"])
    used = json.loads((w["out"] / "model.json").read_text())["contrast"]
    assert used["measured_hu"] == pytest.approx({"p1": 300, "p2": 300}, abs=2)
    assert used["used_hu"] == {"p1": 320.0, "p2": 320.0} and used["clipped"] == ["p1", "p2"]


def test_synthesize_draws_or_sets_the_level_and_records_it(tmp_path):
    w = make_world(tmp_path)
    save_contrast_model(w["model"])
    p = tiny_params(model={"contrast_control": True}, synthesize={"cases": 3})
    drawn = syn.run(p, w["model"], w["interim"], w["split"], tmp_path / "drawn")
    assert drawn.contrast_hu.between(280, 320).all() and drawn.contrast_hu.nunique() == 3
    again = syn.run(p, w["model"], w["interim"], w["split"], tmp_path / "again")
    pd.testing.assert_frame_equal(drawn, again)                            # seeded
    fixed = syn.run(tiny_params(synthesize={"cases": 2, "contrast": 300.0}), w["model"], w["interim"], w["split"],
                    tmp_path / "fixed")
    assert list(fixed.contrast_hu) == [300.0, 300.0]
    for col in ("rot_x_deg", "scale_y", "shift_z_mm"):                     # spatial draws as without the control
        assert list(fixed[col]) == list(drawn[col][:2])
    with pytest.raises(InputError, match="synthesize.contrast 500 HU: outside"):
        syn.run(tiny_params(synthesize={"cases": 1, "contrast": 500.0}), w["model"], w["interim"], w["split"],
                tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
