"""CT or MR (ctsynth.data.modality): the MR phantom, per-volume normalisation, data that do not
match the modality, the params check, and the report's unit. The whole pipeline on the MR phantom:
tests/test_pipeline_e2e.py."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_params
from ctsynth.core.config import params_from_dict
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.labels import BODY, BONE, LUNG, MMWHS_LABEL_MAP
from ctsynth.data import anatomy, ingest, modality, phantom
from ctsynth.report.report import for_modality

SMALL, SPACING = (48, 48, 16), (6.0, 6.0, 8.0)
VALUE = {name: value for value, name in MMWHS_LABEL_MAP.items()}


def test_the_mr_phantom_is_bright_blood_mr_of_the_same_anatomy():
    rng = lambda: np.random.default_rng([42, 0])                          # noqa: E731
    ct, ct_label, ct_anatomy = phantom.make_case(rng(), (96, 96, 24), (3.4, 3.4, 6.0))
    mr, label, truth = phantom.make_case(rng(), (96, 96, 24), (3.4, 3.4, 6.0), "mr")
    assert np.array_equal(label, ct_label) and np.array_equal(truth, ct_anatomy)       # same anatomy
    assert mr.dtype == np.int16 and mr.min() >= 0                                      # magnitude image
    blood, myo = mr[label == VALUE["LV"]].mean(), mr[label == VALUE["Myo"]].mean()
    assert blood > 2 * myo                                                             # bright blood (bSSFP)
    lung_air = (truth == LUNG) & (ct < -600)
    assert mr[lung_air].mean() < 0.5 * myo and mr[truth == 0].mean() < 0.3 * myo       # dark lungs, noise outside
    assert modality.problems(mr, "mr", "x") == [] and modality.problems(ct, "ct", "x") == []
    assert "set data.modality: mr" in modality.problems(mr, "ct", "a.nii")[0]
    assert "set data.modality: ct" in modality.problems(ct, "mr", "b.nii")[0]


def test_mr_normalisation_maps_the_percentiles_to_the_normalised_range():
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10) * 3.0
    nu, lo, hi = modality.normalise_mr(data)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(data, [0.5, 99.5])))
    assert nu.dtype == np.int16 and nu.min() == -1000 and nu.max() == 1000
    assert abs(int(nu.flat[500]) - 0) <= 3                                             # the median near 0 nu
    assert modality.unit({"modality": "mr"}) == "nu" and modality.unit({}) == "HU"      # older stores: CT
    assert modality.body_level("mr") == -700 and modality.body_level({"modality": "ct"}) == -500


def test_ingest_normalises_mr_and_derives_its_anatomy_without_bone(tmp_path):
    phantom.write_dataset(tmp_path / "raw", cases=2, seed=3, shape=SMALL, spacing=SPACING, progress=False,
                          modality="mr")
    p = tiny_params(data={"source": "nifti", "raw_dir": str(tmp_path / "raw"), "modality": "mr"})
    manifest = ingest.run(p, tmp_path / "interim")
    assert list(manifest.case) == ["mr_train_1001", "mr_train_1002"] and set(manifest.modality) == {"mr"}
    assert (manifest.mr_p99_5 > manifest.mr_p0_5).all() and manifest.hu_min.min() >= -1000
    image = np.asanyarray(nib.load(tmp_path / "interim" / "mr_train_1001_image.nii").dataobj)
    assert image.min() == -1000 and image.max() == 1000
    derived = np.asanyarray(nib.load(tmp_path / "interim" / "mr_train_1001_anatomy.nii").dataobj)
    truth = np.asanyarray(nib.as_closest_canonical(nib.load(tmp_path / "raw" / "mr_train_1001_anatomy.nii.gz")).dataobj)
    assert BONE not in np.unique(derived)                                              # no bone rule in MR
    both = (derived > 0) & (truth > 0)
    assert 2 * both.sum() / ((derived > 0).sum() + (truth > 0).sum()) > 0.9            # the body outline
    lung = (derived == LUNG) & (truth == LUNG)
    assert 2 * lung.sum() / ((derived == LUNG).sum() + (truth == LUNG).sum()) > 0.8
    assert set(np.unique(derived)) <= {0, BODY, LUNG}


def test_data_that_do_not_match_the_modality_are_one_error_naming_every_file(tmp_path):
    phantom.write_dataset(tmp_path / "raw", cases=2, seed=3, shape=SMALL, spacing=SPACING, progress=False)  # CT
    p = tiny_params(data={"source": "nifti", "raw_dir": str(tmp_path / "raw"), "modality": "mr"})
    with pytest.raises(InputError) as err:
        ingest.run(p, tmp_path / "interim")
    files = [e for e in err.value.problems if "set data.modality: ct" in e]
    named = [f.split(":")[0].rsplit("/", 1)[1] for f in files]
    assert named == ["ct_train_1001_image.nii.gz", "ct_train_1002_image.nii.gz"]
    assert not (tmp_path / "interim").exists()


def test_mr_refuses_what_only_hounsfield_units_can_say():
    with pytest.raises(ConfigError) as err:
        params_from_dict({"data": {"modality": "mr"}, "preprocess": {"hu_window": [-200, 400]},
                          "model": {"contrast_control": True}})
    text = "\n".join(err.value.problems)
    assert "a window in HU, which MR does not have" in text and "model.contrast_control" in text
    assert params_from_dict({"data": {"modality": "mr"}}).data.modality == "mr"        # the default window is fine


def test_an_mr_report_names_its_unit_and_shows_no_hounsfield_unit():
    page = "<h1>report</h1><p>MAE 61 HU; synthetic CT; HUGE <code>mae_hu</code></p>"
    mr = for_modality(page, {"modality": "mr"})
    assert "HU" not in mr.replace("HUGE", "") and "61 nu" in mr and "synthetic MR" in mr and "mae_hu" in mr
    assert "<b>MR.</b>" in mr and for_modality(page, {"modality": "ct"}) == page


def test_derive_without_a_bone_rule():
    hu = np.full((10, 10, 2), -1000.0, np.float32)
    hu[2:8, 2:8] = 900.0
    out = anatomy.derive(hu, np.zeros(hu.shape, np.uint8), -850.0, None)
    assert set(np.unique(out)) == {0, BODY}
    assert pd.Series(anatomy.counts(out))["bone"] == 0
