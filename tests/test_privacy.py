"""privacy stage (ctsynth.privacy.privacy) and the calibrated threshold (ctsynth.evaluate.nearest)."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_params
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.labels import MMWHS_LABEL_MAP, structure_index
from ctsynth.evaluate.nearest import privacy_rule
from ctsynth.privacy import privacy
from ctsynth.synth import synthesize
from test_generate import make_world


def test_privacy_rule_is_the_reference_quantile_or_the_smaller_cap():
    ref = np.linspace(0.0, 1.0, 101)
    rule = privacy_rule(ref, 0.9, 0.95)
    assert rule.threshold == pytest.approx(0.9) and rule.calibrated == pytest.approx(0.9)
    assert rule.n_reference == 101 and rule.reference_max == 1.0
    assert "0.9 quantile" in rule.describe() and "the smaller of" in rule.describe()
    assert privacy_rule(ref, 0.9, 0.5).threshold == 0.5                     # the cap is smaller
    assert privacy_rule(ref, 0.9, None).threshold == pytest.approx(0.9)
    no_ref = privacy_rule([], 0.99, 0.95)                                      # no validation patients
    assert no_ref.threshold == 0.95 and no_ref.calibrated is None and "cap" in no_ref.describe()
    assert privacy_rule(ref, None, 0.7).calibrated is None
    with pytest.raises(ConfigError, match="no threshold"):
        privacy_rule([], 0.99, None)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def test_mask_overlap_known_answers(tmp_path):
    lab = np.zeros((10, 10, 4), np.uint8)
    lab[2:6, 2:6] = 1                                                          # 64 voxels
    a = _save(tmp_path / "a.nii", lab)
    assert privacy.mask_overlap(a, a) == 1.0
    shifted = np.roll(lab, 2, axis=0)                                          # overlaps half: Dice 0.5
    assert privacy.mask_overlap(a, _save(tmp_path / "b.nii", shifted * 7)) == pytest.approx(0.5)
    assert privacy.mask_overlap(a, _save(tmp_path / "c.nii", np.zeros_like(lab))) == 0.0
    fine = np.repeat(np.repeat(lab, 2, 0), 2, 1)                               # the same mask at half the spacing
    other_grid = _save(tmp_path / "d.nii", fine, np.diag([0.5, 0.5, 1.0, 1.0]) @ np.eye(4))
    other_grid_affine = nib.load(str(other_grid)).affine.copy()
    other_grid_affine[:2, 3] = -0.25                                           # voxel centres line up
    nib.save(nib.Nifti1Image(fine, other_grid_affine), str(other_grid))
    assert privacy.mask_overlap(a, other_grid) == pytest.approx(1.0)


def _plant_copy(world, out, case, source):
    """A 'synthetic' case that is the training case ``source`` itself (image and label, raw values)."""
    image = nib.load(str(world["interim"] / f"{source}_image.nii"))
    label = nib.load(str(world["interim"] / f"{source}_label.nii"))
    raw = {structure_index(name): value for value, name in MMWHS_LABEL_MAP.items()}
    idx = np.asanyarray(label.dataobj)
    values = np.zeros(idx.shape, np.uint16)
    for i, v in raw.items():
        values[idx == i] = v
    nib.save(image, str(out / f"{case}_image.nii.gz"))
    nib.save(nib.Nifti1Image(values, label.affine), str(out / f"{case}_label.nii.gz"))
    manifest = pd.read_csv(out / "manifest.csv")
    row = {c: None for c in manifest.columns} | {"case": case, "source": source, "image_file": f"{case}_image.nii.gz",
                                                 "label_file": f"{case}_label.nii.gz"}
    pd.concat([manifest, pd.DataFrame([row])]).to_csv(out / "manifest.csv", index=False)


@pytest.fixture
def screened(tmp_path):
    """A tiny world (train p3 p4, val p2, test p1), two synthesized cases and a planted copy of p3."""
    w = make_world(tmp_path)
    w["split"].write_text(json.dumps({"seed": 0, "train": ["p3", "p4"], "val": ["p2"], "test": ["p1"]}))
    params = tiny_params(synthesize={"cases": 2})
    synthesize.run(params, w["model"], w["interim"], w["split"], tmp_path / "synthetic")
    _plant_copy(w, tmp_path / "synthetic", "copy_p3", "p3")
    summary = privacy.run(params, tmp_path / "synthetic", w["processed"], w["split"], w["interim"], tmp_path / "out")
    return w, params, tmp_path, summary


def test_stage_withholds_a_copied_training_case_and_names_its_source(screened):
    w, params, root, summary = screened
    cases = pd.read_csv(root / "out" / "privacy_cases.csv").set_index("case")
    slices = pd.read_csv(root / "out" / "privacy_synthetic.csv")
    copy = cases.loc["copy_p3"]
    assert copy.verdict == "withheld" and copy.nearest_case == "p3" and copy.similarity_max > 0.999
    p3_slices = (pd.read_csv(w["processed"] / "slices.csv").case == "p3").sum()     # every one is in the store
    copied = slices[(slices.case == "copy_p3") & (slices.similarity > 0.999)]
    assert len(copied) == p3_slices and (copied.nn_case == "p3").all()         # (its slices are alike in z)
    assert copied.above.all()
    assert copy.mask_dice_source == 1.0
    assert "slice(s) above" in copy.reason and "mask Dice with p3 1.000 > 0.9" in copy.reason
    made = cases.drop(index="copy_p3")
    assert len(made) == 2 and (made.mask_dice_source < 1.0).all() and set(made.source) <= {"p3", "p4"}
    assert set(slices.case) == set(cases.index) and set(slices.nn_case) <= {"p3", "p4"}
    assert (slices.above == (slices.similarity > summary["privacy_threshold"])).all()
    assert summary["privacy_synthetic_n_pass"] == int((cases.verdict == "pass").sum())
    assert summary["privacy_n_reference_slices"] > 0                          # calibrated on p2
    assert summary["privacy_threshold"] == min(summary["privacy_threshold_calibrated"], params.privacy.max_similarity)
    saved = json.loads((root / "out" / "privacy_synthetic.json").read_text())
    assert saved["privacy_synthetic_n_cases"] == 3 and "quantile" in saved["rule"]
    assert saved["privacy_control_warped_withheld"] == pytest.approx((cases.verdict == "withheld").mean())
    held = pd.read_csv(root / "out" / "privacy_calibration.csv")
    assert held.case.tolist() == ["p1"] and held.held_out.tolist() == ["test"]    # one val patient: no LOO rows
    assert saved["privacy_heldout_test_n_patients"] == 1 and saved["privacy_heldout_val_loo_case_withhold"] is None


def test_stage_reports_every_manifest_problem_at_once_and_writes_nothing(screened):
    w, params, root, _ = screened
    bad = root / "bad"
    shutil.copytree(root / "synthetic", bad)
    manifest = pd.read_csv(bad / "manifest.csv")
    manifest.loc[0, "source"] = "p1"                                            # a test patient
    manifest.to_csv(bad / "manifest.csv", index=False)
    (bad / manifest.label_file[1]).unlink()
    with pytest.raises(InputError) as err:
        privacy.run(params, bad, w["processed"], w["split"], w["interim"], root / "out2")
    text = str(err.value)
    assert "source 'p1' is not a training case" in text and f"{manifest.label_file[1]}: missing" in text
    assert not (root / "out2").exists()
    (bad / "manifest.csv").unlink()
    with pytest.raises(InputError, match="manifest.csv: missing"):
        privacy.run(params, bad, w["processed"], w["split"], w["interim"], root / "out2")


def test_case_rule_known_answers():
    """reference: a case may have as large a share of too-close slices as the worst validation
    patient; any: not one; a slice above the hard cap withholds its case whatever the share."""
    assert privacy.reference_share_above(np.array([0.1, 0.9, 0.2, 0.3]), np.array(["a", "a", "b", "b"]), 0.5) == 0.5
    assert privacy.reference_share_above(np.zeros(0), np.zeros(0), 0.5) is None
    assert privacy.case_allowance("any", np.array([0.9]), np.array(["a"]), 0.5) == 0.0
    assert privacy.case_allowance("reference", np.array([0.9, 0.1]), np.array(["a", "a"]), 0.5) == 0.5
    assert privacy.case_allowance("reference", np.zeros(0), np.zeros(0), 0.5) == 0.0    # no validation: strict
    sims = np.r_[np.full(9, 0.4), 0.6]                                        # 1 of 10 slices above 0.5
    slices = pd.DataFrame({"case": "s1", "z": range(10), "similarity": sims, "nn_case": "p3", "nn_z": range(10),
                           "above": sims > 0.5})
    manifest = pd.DataFrame({"case": ["s1"], "source": ["p3"]})

    def verdict(allowed, cap=None, sims_override=None):
        frame = slices if sims_override is None else slices.assign(similarity=sims_override)
        return privacy.case_table(frame, manifest, {}, 0.5, None, allowed, hard_cap=cap).iloc[0]

    assert verdict(0.1).verdict == "pass" and verdict(0.1).share_above == 0.1
    withheld = verdict(0.05)
    assert withheld.verdict == "withheld"
    assert "10% of its slices; no validation patient has more than 5%" in withheld.reason
    assert verdict(0.0).verdict == "withheld"
    near_copy = verdict(1.0, 0.95, np.r_[np.full(9, 0.4), 0.97])
    assert near_copy.verdict == "withheld" and "above the cap privacy.max_similarity 0.95" in near_copy.reason
    assert "any of its slices" in privacy.describe_case_rule("any", 0.0)
    assert "more than 5.0% of its slices" in privacy.describe_case_rule("reference", 0.05)


def test_held_out_rates_calibrate_without_the_patient_they_judge():
    """Each validation patient is judged by the threshold and allowance of the others only: a
    patient far closer to training than the rest is withheld, the others are not; the rates are
    the share of patients withheld and the mean share of their slices above."""
    rng = np.random.default_rng(0)
    cases = np.repeat([f"v{i}" for i in range(6)], 20)
    sims = rng.uniform(0.3, 0.6, len(cases))
    sims[cases == "v5"] = 0.9                                                 # one patient close to training
    loo = privacy.held_out_rates(sims, cases, 0.99, None, "reference").set_index("case")
    assert list(loo.index) == [f"v{i}" for i in range(6)]
    others = sims[cases != "v0"]
    assert loo.loc["v0", "threshold"] == pytest.approx(np.quantile(others, 0.99), abs=1e-5)   # v0 not in it
    assert loo.loc["v5", "withheld"] and loo.loc["v5", "share_above"] == 1.0
    assert not loo.drop(index="v5").withheld.any()
    test = pd.DataFrame([{"case": "t0", **privacy.judge(np.full(5, 0.95), 0.7, 0.1, None)},
                         {"case": "t1", **privacy.judge(np.full(5, 0.5), 0.7, 0.1, 0.95)},
                         {"case": "t2", **privacy.judge(np.r_[np.full(4, 0.5), 0.97], 0.99, 0.5, 0.95)}])
    assert test.withheld.tolist() == [True, False, True]                     # t2: one slice above the hard cap
    summary = privacy.calibration_summary(loo.reset_index(), test)
    assert summary["privacy_heldout_val_loo_case_withhold"] == pytest.approx(1 / 6)
    assert summary["privacy_heldout_test_case_withhold"] == pytest.approx(2 / 3)
    assert summary["privacy_heldout_test_slice_withhold"] == pytest.approx((1.0 + 0 + 0) / 3)
    assert privacy.held_out_rates(sims[:20], cases[:20], 0.99, None, "reference").empty    # one patient: nothing
