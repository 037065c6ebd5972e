"""Partial-volume conditions (``preprocess.partial_volume``): labels kept at k x image_size and
averaged into the fraction of every condition pixel each class covers."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import tiny_params, train_on_raw
from ctsynth.core.errors import InputError, ModelFileError
from ctsynth.core.labels import structure_index
from ctsynth.data import ingest, phantom, preprocess
from ctsynth.data.augment import build_augment
from ctsynth.data.store import ProcessedStore, condition_batch
from ctsynth.synth import generate as gen
from ctsynth.synth import inference


def test_condition_is_the_area_fraction_of_each_class():
    """Known answer: LV on the left 3 of every 4 sub-pixel columns, lung on the top 2 of 4 rows of the
    anatomy; 4 x 4 blocks -> LV 0.75 / 0, lung 0.5, body everywhere inside."""
    fine = np.zeros((1, 8, 8), np.uint8)
    fine[0, :, 0:3] = structure_index("LV")
    classes = np.ones((1, 8, 8), np.uint8)                  # body
    classes[0, 0:2, :] = 2                                  # lung
    cond = condition_batch(fine, ["LV", "RV"], "onehot", anatomy=classes, partial_volume=4).numpy()
    assert cond.shape == (1, 5, 2, 2)
    np.testing.assert_array_equal(cond[0, 0], [[0.75, 0.0], [0.75, 0.0]])       # LV
    np.testing.assert_array_equal(cond[0, 1], np.zeros((2, 2)))                 # RV: absent
    np.testing.assert_array_equal(cond[0, 2], np.ones((2, 2)))                  # body outline
    np.testing.assert_array_equal(cond[0, 3], [[0.5, 0.5], [0.0, 0.0]])         # lung
    with pytest.raises(ValueError, match="not a multiple"):
        condition_batch(fine[:, :7, :7], ["LV"], "onehot", partial_volume=4)


def test_partial_volume_1_is_the_class_condition():
    masks = np.random.default_rng(0).integers(0, 8, (3, 2, 16, 16)).astype(np.uint8)
    a = condition_batch(masks, ["LV", "Myo"], "onehot")
    b = condition_batch(masks, ["LV", "Myo"], "onehot", partial_volume=1)
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}


def test_soft_condition_is_resampled_bilinearly():
    """The same affine draw: a nearest-resampled condition keeps only its values, a soft one (partial
    volumes) gets in-between values along the warped edge, as the image does."""
    cond = torch.zeros(4, 1, 32, 32)
    cond[:, :, :, :16] = 1.0
    real = torch.zeros(4, 1, 32, 32)
    values = []
    for soft in (False, True):
        torch.manual_seed(3)
        warped, _ = build_augment("affine", soft_condition=soft)(cond.clone(), real.clone())
        values.append(((warped > 0.01) & (warped < 0.99)).float().mean().item())
    assert values[0] == 0.0 and values[1] > 0.01


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("pv") / "raw"
    phantom.write_dataset(out, cases=4, seed=5, shape=(48, 48, 16), spacing=(6.0, 6.0, 8.0), progress=False)
    return out


def test_preprocess_keeps_the_store_and_adds_the_fine_labels(raw, tmp_path):
    stores = {}
    for k in (1, 2):
        p = tiny_params(data={"source": "nifti", "raw_dir": str(raw)}, preprocess={"partial_volume": k})
        ingest.run(p, tmp_path / f"interim{k}")
        preprocess.run(p, tmp_path / f"interim{k}", tmp_path / f"processed{k}")
        stores[k] = ProcessedStore(tmp_path / f"processed{k}")
    one, two = stores[1], stores[2]
    assert not (one.root / "masks_fine.npy").exists() and "partial_volume" not in one.meta
    assert one.condition_masks is one.masks and one.partial_volume == 1
    for name in ("images.npy", "masks.npy", "anatomy.npy", "slices.csv"):          # the classes store is unchanged
        assert (one.root / name).read_bytes() == (two.root / name).read_bytes(), name
    assert two.partial_volume == 2 and two.model_meta()["partial_volume"] == 2
    assert two.condition_masks.shape == two.condition_anatomy.shape == (len(two.slices), 64, 64)
    assert two.fingerprint(["c"]) != one.fingerprint(["c"])
    # the fractions of the fine labels add up to the areas of the classes, and are soft on the edges only
    cond = condition_batch(np.asarray(two.condition_masks), two.structures, "onehot", partial_volume=2).numpy()
    hard = condition_batch(np.asarray(one.masks), one.structures, "onehot").numpy()
    area_soft, area_hard = cond.sum(axis=(0, 2, 3)), hard.sum(axis=(0, 2, 3))
    assert (area_hard > 0).all()
    np.testing.assert_allclose(area_soft, area_hard, rtol=0.1)
    soft = (cond > 0) & (cond < 1)
    assert 0 < soft.mean() < 0.05 and not soft[hard.astype(bool) & (cond == 1)].any()


def test_a_partial_volume_model_trains_generates_and_refuses_class_masks(raw, tmp_path):
    p = train_on_raw(raw, tmp_path, preprocess={"partial_volume": 2}, model={"anatomy": True})
    model, meta = inference.load_model(tmp_path / "generator.pt")
    assert meta["partial_volume"] == 2
    stats = gen.run(p, tmp_path / "generator.pt", tmp_path / "processed", tmp_path / "split.json",
                    tmp_path / "interim", tmp_path / "generated")
    fake = np.load(tmp_path / "generated" / "fake.npy")
    assert stats["slices"] == len(fake) > 0 and fake.shape[1:] == (32, 32) and np.isfinite(fake).all()
    mask = raw / "ct_train_1001_label.nii.gz"
    inference.generate_file(tmp_path / "generator.pt", mask, tmp_path / "ct.nii.gz")
    assert nib.load(tmp_path / "ct.nii.gz").shape == nib.load(mask).shape

    synth = inference.MaskToCT(model, meta, batch_size=4)
    assert synth.mask_size == 64 and synth.mask_to_model(np.zeros((48, 48), np.uint8)).shape == (64, 64)
    with pytest.raises(InputError, match="64² masks .*partial_volume 2"):
        synth.unit(np.zeros((2, 32, 32), np.uint8))
    store = ProcessedStore(tmp_path / "processed")
    assert synth.unit(np.asarray(store.condition_masks[:3]), anatomy=np.asarray(store.condition_anatomy[:3])).shape \
        == (3, 32, 32)

    # a store of classes does not fit the model: the generate stage says which setting differs
    classes = tmp_path / "classes"
    preprocess.run(tiny_params(data={"source": "nifti", "raw_dir": str(raw)}), tmp_path / "interim", classes)
    with pytest.raises(ModelFileError, match="partial_volume=2 but the processed store has partial_volume=1"):
        gen.run(p, tmp_path / "generator.pt", classes, tmp_path / "split.json", tmp_path / "interim",
                tmp_path / "generated2")
    assert json.loads((classes / "meta.json").read_text()).get("partial_volume") is None
