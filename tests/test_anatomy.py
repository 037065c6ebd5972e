"""The anatomy around the heart (ctsynth.data.anatomy): the derived rules against the phantom's
true anatomy, supplied label files and presets, the condition channels."""
from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_params, train_on_raw
from ctsynth.core.config import SynthesizeCfg, params_from_dict
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.labels import ANATOMY_PRESETS, BODY, BONE, LUNG, MMWHS_LABEL_MAP, parse_anatomy_map
from ctsynth.data import anatomy, ingest, phantom
from ctsynth.data.augment import build_anatomy_drop
from ctsynth.data.masks import map_labels
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate import validation
from ctsynth.synth import generate, synthesize
from ctsynth.synth.inference import MaskToCT, load_model
from test_generate import save_tiny_model


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def case():
    image, label, truth = phantom.make_case(np.random.default_rng([42, 3]), (96, 96, 24), (3.4, 3.4, 6.0))
    heart, _, problems = map_labels(label, MMWHS_LABEL_MAP, "phantom")
    assert not problems
    return image.astype(np.float32), heart, truth


def test_the_derived_rules_find_the_phantoms_true_anatomy(case):
    """Known answer: the phantom paints every voxel as outside, body, lung/airway or bone."""
    image, heart, truth = case
    derived = anatomy.derive(image, heart)
    assert derived.dtype == np.uint8 and set(np.unique(derived)) <= {0, BODY, LUNG, BONE}
    assert dice(derived > 0, truth > 0) > 0.98                        # body outline
    assert dice(derived == LUNG, truth == LUNG) > 0.9                  # lungs, their vessels, airways
    true_bone = truth == BONE
    assert (derived == BONE)[true_bone].mean() > 0.7                 # most bone found (thin ribs blur)
    # what the rule calls bone beyond the true bone is dense: contrast in unlabelled vessels, bone edges
    extra = (derived == BONE) & ~true_bone
    assert np.all(image[extra] > 200) and not (derived[heart > 0] == BONE).any()


def test_rules_known_answers_on_a_drawn_volume():
    """A box of tissue with an air hole, a dense rod and a labelled dense blob, in air."""
    hu = np.full((20, 20, 6), -1000.0, np.float32)
    hu[3:17, 3:17] = 40.0
    hu[6:10, 6:10] = -850.0                                          # lung: air inside the body
    hu[12:14, 12:14] = 600.0                                         # bone
    hu[5:7, 13:15] = 400.0                                           # contrast in a labelled structure
    heart = np.zeros(hu.shape, np.uint8)
    heart[5:7, 13:15] = 3
    hu[0:2, 0:2] = 50.0                                              # a speck outside the largest body
    out = anatomy.derive(hu, heart)
    assert (out[6:10, 6:10] == LUNG).all() and (out[12:14, 12:14] == BONE).all()
    assert (out[5:7, 13:15] == BODY).all()                           # never bone inside the heart labels
    assert (out[0:2, 0:2] == 0).all() and (out[3:17, 3:17] > 0).all()
    assert anatomy.counts(out) == {"body": 14 * 14 * 6, "lung": 16 * 6, "bone": 4 * 6}


def test_supplied_labels_map_to_classes_and_take_the_body_from_the_image(case):
    image, heart, truth = case
    classes, problems = anatomy.from_labels(truth, parse_anatomy_map("ctsynth"), image, -500, "x.nii.gz")
    assert not problems and np.array_equal(classes, truth)
    total = np.zeros(truth.shape, np.int16)                          # as TotalSegmentator `total` writes them
    total[truth == LUNG] = 12                                        # lung_upper_lobe_right
    total[truth == BONE] = 116                                       # sternum
    total[(truth == BODY) & (heart > 0)] = 51                        # heart: not named, ignored
    classes, problems = anatomy.from_labels(total, parse_anatomy_map("totalsegmentator-total"), image, -500, "t")
    assert not problems
    assert (classes[truth == LUNG] == LUNG).all() and (classes[truth == BONE] == BONE).all()
    assert dice(classes > 0, truth > 0) > 0.98                       # no body value: the outline from the image
    _, problems = anatomy.from_labels(np.full(truth.shape, 7, np.uint8), {1: "lung"}, image, -500, "c.nii.gz")
    assert problems and "c.nii.gz" in problems[0] and "none of the anatomy label values" in problems[0]


def test_anatomy_maps_and_presets_report_every_problem():
    assert parse_anatomy_map({"1": "body", 2: "lung"}) == {1: "body", 2: "lung"}
    assert set(ANATOMY_PRESETS["totalsegmentator-total"].values()) == {"lung", "bone"}
    with pytest.raises(ConfigError) as err:
        parse_anatomy_map({"x": "body", 0: "lung", 3: "liver"})
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError, match="not an anatomy preset; presets: ctsynth, totalsegmentator-total"):
        parse_anatomy_map("totalseg")


def test_channels_are_body_outline_lung_and_bone():
    classes = np.array([[0, 1], [2, 3]], np.uint8)
    ch = anatomy.channels(classes)
    assert ch.shape == (3, 2, 2) and ch.dtype == np.float32
    assert ch[0].tolist() == [[0, 1], [1, 1]] and ch[1].tolist() == [[0, 0], [1, 0]]
    assert ch[2].tolist() == [[0, 0], [0, 1]]
    assert anatomy.channels(np.zeros((5, 4, 4), np.uint8)).shape == (5, 3, 4, 4)


# ------------------------------------------------------------------ through the pipeline's stages

SMALL, SPACING = (48, 48, 16), (6.0, 6.0, 8.0)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """phantom -> ingest (derived anatomy) -> preprocess -> split -> train (model.anatomy, drop 0.5)."""
    root = tmp_path_factory.mktemp("anatomy")
    phantom.write_dataset(root / "raw", cases=4, seed=1, shape=SMALL, spacing=SPACING, progress=False)
    p = train_on_raw(root / "raw", root, model={"anatomy": True}, train={"anatomy_drop": 0.5})
    return {"root": root, "params": p, "split": json.loads((root / "split.json").read_text())}


def test_ingest_writes_the_anatomy_and_preprocess_stores_it(pipeline):
    root = pipeline["root"]
    manifest = pd.read_csv(root / "interim" / "manifest.csv")
    assert set(manifest.anatomy_source) == {"derived"} and (manifest.vox_lung > 0).all()
    case = manifest.case.iloc[0]
    derived = np.asanyarray(nib.load(root / "interim" / f"{case}_anatomy.nii").dataobj)
    truth = nib.as_closest_canonical(nib.load(root / "raw" / f"{case}_anatomy.nii.gz"))   # the phantom's answer
    assert derived.shape == truth.shape and dice(derived > 0, np.asanyarray(truth.dataobj) > 0) > 0.95
    store = ProcessedStore(root / "processed")
    assert store.anatomy.shape == store.masks.shape and set(np.unique(store.anatomy)) <= {0, BODY, LUNG, BONE}
    assert store.meta["anatomy"] == "derived"


def test_a_model_with_anatomy_records_it_and_draws_with_or_without_it(pipeline):
    root = pipeline["root"]
    model, meta = load_model(root / "generator.pt")
    assert meta["anatomy"] == {"channels": ["body", "lung", "bone"], "source": "derived", "drop": 0.5}
    assert meta["in_channels"] == 7 + 3
    store = ProcessedStore(root / "processed")
    rows = store.rows_for_cases(pipeline["split"]["test"])[:4]
    synth = MaskToCT(model, meta)
    given = synth.unit(np.asarray(store.masks[rows]), anatomy=np.asarray(store.anatomy[rows]))
    blank = synth.unit(np.asarray(store.masks[rows]))                 # a user with heart labels only
    assert given.shape == blank.shape == (4, 32, 32) and not np.allclose(given, blank)
    strict = MaskToCT(model, {**meta, "anatomy": {**meta["anatomy"], "drop": 0.0}})
    with pytest.raises(InputError, match="body, lung, bone.*never learned to draw without it"):
        strict.unit(np.asarray(store.masks[rows]))


def test_generation_and_synthesis_use_the_anatomy_of_the_case(pipeline):
    root, p = pipeline["root"], pipeline["params"]
    generate.run(p, root / "generator.pt", root / "processed", root / "split.json", root / "interim", root / "gen")
    case = pipeline["split"]["test"][0]
    assert nib.load(root / "gen" / f"{case}_synth.nii.gz").shape == SMALL
    # drop > 0: the validation slices are also drawn without the anatomy, and scored (val_heart_only_*)
    with_anatomy, alone = (np.load(root / "gen" / "val" / sub / "fake.npy") for sub in (".", "heart_only"))
    index = np.load(root / "gen" / "val" / "heart_only" / "index.npy")
    assert alone.shape == with_anatomy.shape and not np.array_equal(alone, with_anatomy)
    summary = validation.paired_only(ProcessedStore(root / "processed"), alone, index, 8)
    assert 0 < summary["ssim"] < 1 and summary["mae_hu_background"] > 0
    p2 = dataclasses.replace(p, synthesize=SynthesizeCfg(cases=2, seed=3))
    manifest = synthesize.run(p2, root / "generator.pt", root / "interim", root / "split.json", root / "synth")
    assert list(manifest.anatomy_file) == ["synth_0001_anatomy.nii.gz", "synth_0002_anatomy.nii.gz"]
    warped = np.asanyarray(nib.load(root / "synth" / "synth_0001_anatomy.nii.gz").dataobj)
    label = np.asanyarray(nib.load(root / "synth" / "synth_0001_label.nii.gz").dataobj)
    assert warped.shape == label.shape and set(np.unique(warped)) <= {0, BODY, LUNG, BONE}
    assert (warped[label > 0] > 0).mean() > 0.95                      # warped with the heart: the heart is in the body
    assert pd.read_csv(root / "synth" / "manifest.csv").anatomy_file.notna().all()
    # a heart-only model still writes each case's warped anatomy (and draws without it)
    heart_only = MaskToCT(*load_model(save_tiny_model(root / "heart_only.pt")))
    sources = synthesize.interim_sources(root / "interim", pipeline["split"]["train"])
    out = synthesize.synthesize_dataset(heart_only, sources, SynthesizeCfg(cases=1, seed=3), root / "synth2",
                                        p.data.label_map)
    assert (root / "synth2" / out.anatomy_file.iloc[0]).is_file()


def test_supplied_anatomy_missing_for_some_cases_is_one_error_naming_each(tmp_path):
    phantom.write_dataset(tmp_path / "raw", cases=3, seed=2, shape=SMALL, spacing=SPACING, progress=False)
    for case in ("ct_train_1001", "ct_train_1003"):
        (tmp_path / "raw" / f"{case}_anatomy.nii.gz").unlink()
    p = tiny_params(data={"source": "nifti", "raw_dir": str(tmp_path / "raw"), "anatomy": {"source": "supplied"}})
    with pytest.raises(InputError) as err:
        ingest.run(p, tmp_path / "interim")
    text = str(err.value)
    assert "ct_train_1001_anatomy.nii.gz: missing anatomy label file" in text and "ct_train_1003_anatomy" in text
    assert "ct_train_1002" not in text and not (tmp_path / "interim").exists()       # nothing half-written
    (tmp_path / "raw" / "ct_train_1002_image.nii.gz").rename(tmp_path / "keep.nii.gz")
    for case in ("ct_train_1001", "ct_train_1003"):                   # supplied files = the phantom's truth
        (tmp_path / "raw" / f"{case}_image.nii.gz").unlink()
        (tmp_path / "raw" / f"{case}_label.nii.gz").unlink()
    (tmp_path / "keep.nii.gz").rename(tmp_path / "raw" / "ct_train_1002_image.nii.gz")
    manifest = ingest.run(p, tmp_path / "interim")
    assert list(manifest.anatomy_source) == ["supplied"]


def test_bad_anatomy_settings_are_reported_together():
    with pytest.raises(ConfigError) as err:
        params_from_dict({"data": {"anatomy": {"source": "supplied", "label_map": "totalseg", "body_hu": 300}},
                          "model": {"anatomy": True}})
    text = "\n".join(err.value.problems)
    assert "not an anatomy preset" in text and "body_hu 300 must be below bone_hu 200" in text
    with pytest.raises(ConfigError, match="model.anatomy: true needs anatomy from ingest"):
        params_from_dict({"data": {"anatomy": {"source": "none"}}, "model": {"anatomy": True}})


def test_the_anatomy_drop_blanks_whole_slices_deterministically():
    assert build_anatomy_drop(tiny_params(model={"anatomy": True}, train={"anatomy_drop": 0.0}), ["Myo", "LV"]) is None
    assert build_anatomy_drop(tiny_params(train={"anatomy_drop": 0.5}), ["Myo", "LV"]) is None  # no anatomy
    drop = build_anatomy_drop(tiny_params(model={"anatomy": True}, train={"anatomy_drop": 0.5}), ["Myo", "LV"])
    cond = torch.ones(64, 2 + 3, 4, 4)
    out = drop(cond, step=7)
    assert torch.equal(out[:, :2], cond[:, :2]) and torch.equal(cond, torch.ones_like(cond))   # masks kept, no in-place
    blank = out[:, 2:].flatten(1).sum(1) == 0
    assert torch.equal(out[~blank, 2:], cond[~blank, 2:]) and 15 < int(blank.sum()) < 49        # whole slices, ~half
    assert torch.equal(drop(cond, step=7), out) and not torch.equal(drop(cond, step=8), out)   # (seed, rank, step)


def test_synthesize_from_a_label_folder_takes_the_anatomy_beside_each_label_file(pipeline, tmp_path):
    """`ctsynth synthesize --anatomy-suffix`: each label file's anatomy is warped with it and conditions
    the model; a missing file is named (all of them at once); a heart-only model refuses the option."""
    import shutil

    root = pipeline["root"]
    kw = {"cases": 2, "seed": 3, "pattern": "*_label.nii.gz"}
    given = synthesize.synthesize_folder(root / "generator.pt", root / "raw", tmp_path / "a", **kw,
                                         anatomy_suffix="_anatomy.nii.gz", label_suffix="_label.nii.gz")
    alone = synthesize.synthesize_folder(root / "generator.pt", root / "raw", tmp_path / "b", **kw)
    assert list(given.anatomy_file) == ["synth_0001_anatomy.nii.gz", "synth_0002_anatomy.nii.gz"]
    assert alone.anatomy_file.fillna("").eq("").all()
    images = [np.asanyarray(nib.load(tmp_path / d / "synth_0001_image.nii.gz").dataobj) for d in ("a", "b")]
    assert images[0].shape == images[1].shape and not np.array_equal(*images)    # the anatomy changed the drawing
    warped = np.asanyarray(nib.load(tmp_path / "a" / "synth_0001_anatomy.nii.gz").dataobj)
    label = np.asanyarray(nib.load(tmp_path / "a" / "synth_0001_label.nii.gz").dataobj)
    assert (warped[label > 0] > 0).mean() > 0.95
    folder = tmp_path / "labels"
    shutil.copytree(root / "raw", folder)
    gone = sorted(folder.glob("*_anatomy.nii.gz"))[:2]
    for path in gone:
        path.unlink()
    with pytest.raises(InputError) as e:
        synthesize.synthesize_folder(root / "generator.pt", folder, tmp_path / "c", **kw,
                                     anatomy_suffix="_anatomy.nii.gz", label_suffix="_label.nii.gz")
    assert all(any(p.name in line and "is missing" in line for line in e.value.problems) for p in gone)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="--anatomy-suffix: .* not conditioned on the anatomy"):
        synthesize.synthesize_folder(save_tiny_model(tmp_path / "heart.pt"), root / "raw", tmp_path / "d", **kw,
                                     anatomy_suffix="_anatomy.nii.gz")
