"""The utility study (ctsynth.tools.utility_study): one cell end to end on a tiny world, the summary's
table, contrast, figure and sentence, its statistics on known answers, and bad input. The DVC
pipeline itself (studies/utility/dvc.yaml): tests/test_pipeline_e2e.py."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import tiny_params
from ctsynth.core.errors import ConfigError
from ctsynth.tools import utility_study as study
from test_generate import make_world

STUDY = {"n_real": [1, 0], "draws": [1, 2], "seeds": [1], "shares": [0.5], "synthetic_cases": 1, "iterations": 4,
         "bootstrap": 50}


def write_study(path, **changes):
    path.write_text(yaml.safe_dump({"study": {**STUDY, **changes}}))
    return path


@pytest.fixture
def world(tmp_path):
    w = make_world(tmp_path)
    w["split"].write_text(json.dumps({"seed": 0, "train": ["p3", "p4"], "val": ["p2"], "test": ["p1"]}))
    return w


def test_a_cell_trains_every_arm_and_scores_validation_and_test_patients(world, tmp_path):
    params = tiny_params(synthesize={"cases": 1})
    spec = write_study(tmp_path / "study.yaml")
    out = study.run_cell(params, spec, 1, 2, world["processed"], world["split"], interim_dir=world["interim"],
                         model_path=world["model"],
                         out_json=tmp_path / "cells" / "n1-d2.json")
    assert out["patients"] in (["p3"], ["p4"]) and out["n_synthetic_cases"] == 1 and out["iterations"] == 4
    assert set(out["results"]) == {"real", "classic", "synthetic@0.5", "pretrain", "own-G@0.5"}   # n <= 2: own G
    scored = out["results"]["classic"]["1"]
    assert set(scored) == {"val", "test"} and set(scored["test"]) == {"p1"} and set(scored["val"]) == {"p2"}
    counts = np.asarray(scored["test"]["p1"])
    assert counts.shape == (3, 8) and (counts[2, 1:] > 0).any()          # Σ|T| of the structures present
    again = study.run_cell(params, spec, 1, 2, world["processed"], world["split"], interim_dir=world["interim"],
                           model_path=world["model"],
                           out_json=tmp_path / "cells" / "again.json")
    assert again["patients"] == out["patients"] and again["results"] == out["results"]   # seeded: repeatable
    skipped = study.run_cell(params, spec, 0, 2, world["processed"], world["split"], interim_dir=world["interim"],
                             model_path=world["model"], out_json=tmp_path / "cells" / "n0-d2.json")
    assert skipped == {} and "one draw" in json.loads((tmp_path / "cells" / "n0-d2.json").read_text())["skipped"]


def test_the_summary_writes_the_curve_contrast_figure_and_sentence(world, tmp_path):
    params = tiny_params(synthesize={"cases": 1})
    spec = write_study(tmp_path / "study.yaml")
    for n, draw in ((1, 1), (0, 1), (0, 2)):
        study.run_cell(params, spec, n, draw, world["processed"], world["split"], interim_dir=world["interim"],
                       model_path=world["model"],
                       out_json=tmp_path / "cells" / f"n{n}-d{draw}.json")
    (tmp_path / "cells" / "again.json").unlink(missing_ok=True)
    summary = study.summarize(tmp_path / "cells", tmp_path / "results", spec, publish=tmp_path / "published.json")
    curve = pd.read_csv(tmp_path / "results" / "curve.csv")
    assert sorted(curve.n.unique()) == [1, 2]
    assert set(curve.arm) == {"real", "classic", "synthetic@0.5", "pretrain", "own-G@0.5"}
    assert set(curve[curve.n == 2].arm) == {"real", "classic", "synthetic@0.5", "pretrain"}   # all: no own G
    assert ((curve.lo <= curve.dice + 1e-9) & (curve.dice <= curve.hi + 1e-9)).all()
    contrasts = pd.read_csv(tmp_path / "results" / "contrasts.csv")
    main = contrasts[~contrasts.arm.str.startswith("own-G")]
    assert list(main.n) == [1, 2] and set(main.arm) <= {"synthetic@0.5", "pretrain"} and set(main.minus) == {"classic"}
    own = contrasts[contrasts.arm == "own-G@0.5"]
    assert list(own.n) == [1, 1] and set(own.minus) == {"classic", "synthetic@0.5"}
    assert own[own.minus != "classic"].worth_patients.isna().all()       # worth: against classic only
    assert summary["sentence"].startswith("Against classic augmentation, synthetic data (")
    assert "real patient(s) (" in summary["sentence"] and "Dice, 95 %" in summary["sentence"]
    saved = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert saved["chosen_on_validation"]["1"]["share_arm"] == "synthetic@0.5"
    assert saved["sentence"] == summary["sentence"]
    assert (tmp_path / "results" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    published = json.loads((tmp_path / "published.json").read_text())      # what the pipeline's report leads with
    assert published["sentence"] == summary["sentence"] and "validation" in published["measured_on"]
    assert len(published["curve"]) == len(curve) and len(published["contrasts"]) == len(contrasts)
    assert "| n real |" in (tmp_path / "results" / "results.md").read_text()
    structures = pd.read_csv(tmp_path / "results" / "per_structure.csv")
    assert {"n", "arm"} < set(structures.columns) and len(structures) == len(curve)


def test_two_way_bootstrap_and_worth_known_answers():
    const = np.full((3, 4), 0.8)
    assert study.two_way_bootstrap(const, 200, 0) == pytest.approx((0.8, 0.8))
    spread = np.array([[0.0, 1.0], [0.0, 1.0]])          # the spread is all between patients
    lo, hi = study.two_way_bootstrap(spread, 2000, 0)
    assert lo == 0.0 and hi == 1.0
    curve = pd.Series([0.5, 0.7, 0.8], index=[1, 2, 4])
    assert study.worth(curve, 1, 0.7) == pytest.approx(1.0)              # reaches 2 patients' Dice: worth +1
    assert study.worth(curve, 1, 0.75) == pytest.approx(2 ** 1.5 - 1)    # log-linear between 2 and 4
    assert study.worth(curve, 1, 0.9) is None                            # beyond the grid
    assert study.mlflow_name("synthetic@0.25") == "synthetic_share0.25"   # MLflow refuses '@' in metric names


def test_bad_study_params_are_one_error_listing_every_problem(tmp_path):
    spec = write_study(tmp_path / "study.yaml", n_real=[1, 9], synthetic_cases=0, shares=[0.5, 1.5], draws=[0],
                       own_generator_share=2, bogus=1)
    with pytest.raises(ConfigError) as err:
        study.load_study(spec, n_train=4)
    text = str(err.value)
    for bit in ("asks for 9 real patients, the split has 4", "study.synthetic_cases: must be >= 1",
                "study.shares: synthetic shares per batch in [0, 1]", "study.draws", "study.bogus: unknown key",
                "study.own_generator_share"):
        assert bit in text, (bit, text)


def test_a_bad_cell_writes_nothing(world, tmp_path):
    spec = write_study(tmp_path / "study.yaml", n_real=[1, 3])
    with pytest.raises(ConfigError, match="asks for 3 real patients, the split has 2"):
        study.run_cell(tiny_params(), spec, 1, 1, world["processed"], world["split"], interim_dir=world["interim"],
                       model_path=world["model"], out_json=tmp_path / "cells" / "n1-d1.json")
    assert not (tmp_path / "cells").exists()


def test_lead_sentence_reads_every_n_by_its_interval_and_carries_the_own_generator_caveat():
    contrasts = [
        {"n": 1, "arm": "synthetic@0.5", "minus": "classic", "gain": 0.038, "lo": 0.005, "hi": 0.091},
        {"n": 1, "arm": "own-G@0.5", "minus": "classic", "gain": 0.003, "lo": -0.025, "hi": 0.034},
        {"n": 1, "arm": "own-G@0.5", "minus": "synthetic@0.5", "gain": -0.035, "lo": -0.07, "hi": -0.01},
        {"n": 2, "arm": "synthetic@0.25", "minus": "classic", "gain": 0.009, "lo": -0.006, "hi": 0.033},
        {"n": 12, "arm": "synthetic@0.25", "minus": "classic", "gain": -0.007, "lo": -0.011, "hi": -0.002}]
    text = study.lead_sentence(contrasts)
    assert "helps at 1 real patient(s) (+0.038" in text and "costs Dice at 12 real patient(s) (-0.007" in text
    assert "is not resolved at 2" in text and "Caveat" in text and "+0.003 [-0.025, +0.034]" in text
    assert study.lead_sentence([]) is None and study.lead_sentence(None) is None
