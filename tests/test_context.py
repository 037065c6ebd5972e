"""2.5-D conditioning (model.context_slices): neighbour lookup, condition layout, model files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_store, tiny_params
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.labels import STRUCTURES, encode_condition
from ctsynth.data.store import ProcessedStore, SliceDataset, condition_batch, context_masks, neighbour_rows
from ctsynth.synth import inference
from ctsynth.train.networks import build_generator, save_generator
from test_generate import SIZE, WINDOW, make_world, run_stage


def save_context_model(path, k: int, drop_key: bool = False):
    cfg = tiny_params(model={"context_slices": k}).model
    in_ch = len(STRUCTURES) * (2 * k + 1)
    torch.manual_seed(0)
    g = build_generator(cfg, in_ch)
    cfg_dict = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if not (drop_key and f == "context_slices")}
    save_generator(path, g, cfg_dict, in_ch, {
        "image_size": SIZE, "hu_window": WINDOW, "structures": list(STRUCTURES),
        "label_map": {"205": "Myo", "420": "LA", "500": "LV", "550": "RA", "600": "RV", "820": "Ao",
                      "850": "PA"}, "encoding": "onehot"})
    return path


def test_neighbour_rows_stay_in_the_case_and_pad_the_edges(tmp_path):
    store = ProcessedStore(make_store(tmp_path / "p", cases=("a", "b"), slices_per_case=4))
    # shuffle the store's row order so z order != row order
    frame = store.slices.sample(frac=1.0, random_state=0).reset_index(drop=True)
    store.slices = frame
    rows = np.arange(len(frame))
    table = neighbour_rows(store, rows, 2)                                    # (8, 5)
    assert table.shape == (8, 5)
    z, case = frame.z.to_numpy(), frame.case.to_numpy()
    for r, nb in zip(rows, table):
        assert (case[nb] == case[r]).all()
        assert list(z[nb]) == [min(max(z[r] + d, 0), 3) for d in range(-2, 3)]
    assert np.array_equal(neighbour_rows(store, rows, 0), rows[:, None])


def test_condition_layout_is_slice_major(tmp_path):
    store = ProcessedStore(make_store(tmp_path / "p", cases=("a",), slices_per_case=5))
    ds0, ds1 = SliceDataset(store, np.arange(5), "onehot"), SliceDataset(store, np.arange(5), "onehot", context=1)
    c = len(store.structures)
    cond0, img0 = ds0[2]
    cond1, img1 = ds1[2]
    assert cond0.shape == (c, 32, 32) and cond1.shape == (3 * c, 32, 32)
    assert torch.equal(img0, img1) and torch.equal(cond1[c:2 * c], cond0)     # centre = the slice itself
    assert torch.equal(cond1[:c], torch.from_numpy(encode_condition(store.masks[1], store.structures, "onehot")))
    assert torch.equal(ds1[0][0][:c], ds1[0][0][c:2 * c])                      # edge: z-1 repeats z
    assert not torch.equal(cond1[:c], cond1[2 * c:])
    masks = np.asarray(store.masks[:3])
    assert torch.equal(condition_batch(masks, store.structures, "onehot"),
                       condition_batch(masks[:, None], store.structures, "onehot"))


def test_context_masks_of_a_volume():
    vol = np.arange(4)[:, None, None] * np.ones((4, 2, 2), np.uint8)
    ctx = context_masks(vol, 1)
    assert ctx.shape == (4, 3, 2, 2)
    assert [list(ctx[i, :, 0, 0]) for i in range(4)] == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


def test_config_range():
    with pytest.raises(ConfigError, match="context_slices"):
        tiny_params(model={"context_slices": -1})


def test_old_model_files_mean_k_zero_and_k_is_recorded(tmp_path):
    _, meta_old = inference.load_model(save_context_model(tmp_path / "old.pt", 0, drop_key=True))
    assert meta_old["context_slices"] == 0
    model, meta = inference.load_model(save_context_model(tmp_path / "k2.pt", 2))
    assert meta["context_slices"] == 2 and meta["in_channels"] == 5 * len(STRUCTURES)
    synth = inference.MaskToCT(model, meta)
    masks = np.zeros((3, SIZE, SIZE), np.uint8)
    with pytest.raises(InputError, match="context_slices=2"):
        synth.unit(masks)
    assert synth.unit(np.zeros((3, 5, SIZE, SIZE), np.uint8)).shape == (3, SIZE, SIZE)


def test_context_changes_the_output_and_volume_uses_neighbours(tmp_path):
    """A k=1 generator sees the neighbours: the same centre slice with other neighbours gives
    another image, and a volume's slice z is generated from masks z-1, z, z+1."""
    model, meta = inference.load_model(save_context_model(tmp_path / "k1.pt", 1))
    synth = inference.MaskToCT(model, meta, batch_size=4)
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 8, size=(SIZE, SIZE, 6)).astype(np.uint8)          # canonical (X, Y, Z)
    out = synth.volume(vol)
    assert out.shape == vol.shape
    model_masks = np.stack([synth.mask_to_model(vol[:, :, z]) for z in range(6)])
    direct = synth.unit(context_masks(model_masks, 1))
    other = model_masks.copy()
    other[0] = 0                                                               # change slice 0 only
    changed = synth.unit(context_masks(other, 1))
    assert not np.allclose(changed[1], direct[1])                              # slice 1 sees slice 0
    assert np.allclose(changed[3], direct[3])                                  # slice 3 does not


def test_generate_stage_with_context(tmp_path):
    world = make_world(tmp_path)
    save_context_model(world["model"], 1)
    run_stage(world)
    fake, index = np.load(world["out"] / "fake.npy"), np.load(world["out"] / "index.npy")
    assert fake.shape[0] == len(index) and np.isfinite(fake.astype(np.float32)).all()
    assert len(list(world["out"].glob("*_synth.nii.gz"))) >= 1


def test_training_with_context_records_k_and_generates(tmp_path):
    import json

    from ctsynth.train.train import run as train

    make_store(tmp_path / "processed")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}))
    p = tiny_params(model={"context_slices": 1}, tracking={"enabled": False},
                    train={"iterations": 3, "snapshot_at": [0, 1]}, train_run={"checkpoint_every": 100, "log_every": 1})
    out = tmp_path / "run"
    result = train(p, tmp_path / "processed", tmp_path / "split.json", out / "generator.pt", out / "ckpt",
                   out / "reports", run_file=out / "mlflow_run.json")
    assert result.step == 3 and len(list((out / "reports" / "snapshots").glob("*.png"))) == 2
    model, meta = inference.load_model(out / "generator.pt")
    assert meta["context_slices"] == 1 and meta["in_channels"] == 3 * 7
    store = ProcessedStore(tmp_path / "processed")
    rows = store.rows_for_cases(["c4"])
    fake = inference.MaskToCT(model, meta).unit(np.asarray(store.masks[neighbour_rows(store, rows, 1)]))
    assert fake.shape == (len(rows), 32, 32) and np.isfinite(fake).all()
