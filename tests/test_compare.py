"""ctsynth compare: grouping of `dvc exp show --json`, the statistics over training seeds, the
errors, and the plan of `compare run`.

The fixture tests/data/dvc_exp_show_seed_grid.json is the real output of `dvc exp show --json` of
DVC 3.67.1, trimmed (params to the seed, model and train sections; deps/outs/meta and the
executors' log paths dropped). It comes from a throwaway DVC repo holding a copy of this
params.yaml and one stage writing reports/headline.json from its params with `python -c`
(k = model.context_slices, s = train.seed, w = k + 1):

    ssim = 0.6 + 0.1 k + 0.01 ((s² w) mod 5),   mae_hu = 60 − 2 k + (s w) mod 3,   n_test_cases = 4

filled by `ctsynth compare run --set model.context_slices=0,1 --seeds 1,2,3 --name ctx` (ctx-1..6),
`... --set train.lr_g=0.0001 --seeds 1 --name lr` (lr-1) and `... --set model.context_slices=5
--seeds 1 --name big` (big-1, which failed: the stage refuses k > 4; DVC still shows it with
its baseline's metrics). No test here runs DVC: a real queued experiment takes ~20 s.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pandas as pd
import pytest

from conftest import REPO
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.tools import compare
from ctsynth.tools.compare import build_study, parse_show, pick_baseline, summarise

FIXTURE = REPO / "tests" / "data" / "dvc_exp_show_seed_grid.json"
PARAMS = REPO / "params.yaml"
T_975 = {1: 12.706205, 2: 4.302653}        # Student t 0.975 quantiles (df 1, 2), from a printed table
K = "model.context_slices"


def doc() -> list:
    return json.loads(FIXTURE.read_text())


def experiments():
    return parse_show(doc())


def rows_by(rows, metric: str) -> dict:
    return {r.config: r for r in rows if r.metric == metric}


def fake_dvc(*docs, calls=None, workers="Worker status: 1 active, 0 idle"):
    """A stand-in for compare.dvc: `exp show --json` answers the documents in turn (the last one
    from then on), `queue status` answers ``workers``, everything else is recorded."""
    answers = [json.dumps(d) for d in docs]
    calls = [] if calls is None else calls

    def run(args):
        calls.append(args)
        if args[:2] == ["exp", "show"]:
            return answers.pop(0) if len(answers) > 1 else answers[0]
        return workers if args[:2] == ["queue", "status"] else ""
    return run, calls


def test_the_recorded_document_parses_into_experiments_with_their_states():
    workspace, exps = experiments()
    assert workspace["model.context_slices"] == 0 and workspace["train.seed"] is None
    by_name = {e.name: e for e in exps}
    assert sorted(by_name) == ["big-1", "ctx-1", "ctx-2", "ctx-3", "ctx-4", "ctx-5", "ctx-6", "lr-1"]
    assert by_name["big-1"].state == "failed" and by_name["ctx-4"].state == "success"
    assert by_name["ctx-4"].params[K] == 1 and by_name["ctx-4"].params["train.seed"] == 1
    assert by_name["ctx-4"].metrics == {"ssim": 0.72, "mae_hu": 60.0, "n_test_cases": 4.0}
    assert by_name["ctx-4"].params["train.snapshot_at"] == [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]


def test_numeric_metrics_only_and_a_key_in_two_files_is_named_by_its_file():
    data = {"metrics": {"a.json": {"data": {"x": 1, "flag": True, "s": "text", "none": None, "nest": {"y": 2}}},
                        "b.json": {"data": {"x": 3}}, "broken.json": {"error": {"msg": "no file"}}}}
    assert compare._flat_metrics(data) == {"a.json:x": 1.0, "b.json:x": 3.0, "nest.y": 2.0}


def test_mean_sd_and_the_paired_t_interval_by_hand():
    """ssim over seeds 1, 2, 3: k=0 gives .61 .64 .64, k=1 .72 .73 .73; paired differences .11 .09
    .09: mean .096667, sd .011547, half width t(.975, 2) sd / sqrt 3 = .028686."""
    _, exps = experiments()
    study = build_study(exps, ["train.seed"], "ctx")
    assert study.grid_keys == [K] and list(study.configs) == [f"{K}=0", f"{K}=1"]
    rows = summarise(study, ["ssim", "mae_hu"], f"{K}=0")
    base, other = rows_by(rows, "ssim")[f"{K}=0"], rows_by(rows, "ssim")[f"{K}=1"]
    assert (base.n_seeds, base.seeds, base.note) == (3, "1,2,3", "baseline") and base.diff is None
    assert base.mean == pytest.approx(0.63) and base.sd == pytest.approx(math.sqrt(0.0003))
    base_half = T_975[2] * math.sqrt(0.0003) / math.sqrt(3)             # the mean's own interval over seeds
    assert (base.mean_lo, base.mean_hi) == (pytest.approx(0.63 - base_half), pytest.approx(0.63 + base_half))
    assert other.mean == pytest.approx(0.726667, abs=1e-6) and other.sd == pytest.approx(0.0057735, abs=1e-7)
    half = T_975[2] * 0.011547005 / math.sqrt(3)
    assert other.n_pairs == 3 and other.diff == pytest.approx(0.096667, abs=1e-6)
    assert (other.diff_lo, other.diff_hi) == (pytest.approx(0.096667 - half, abs=1e-6),
                                              pytest.approx(0.096667 + half, abs=1e-6))
    mae = rows_by(rows, "mae_hu")[f"{K}=1"]                 # differences -1 -3 -2: mean -2, sd 1
    assert (mae.mean, mae.sd, mae.diff) == (pytest.approx(59), pytest.approx(1), pytest.approx(-2))
    assert mae.diff_lo == pytest.approx(-2 - T_975[2] / math.sqrt(3), abs=1e-5)
    assert mae.diff_hi == pytest.approx(-2 + T_975[2] / math.sqrt(3), abs=1e-5)


def test_the_interval_uses_only_paired_seeds_and_says_which_were_left_out():
    """Without ctx-5 (k=1, seed 2) the pairs are seeds 1 and 3 (.11, .09): df 1."""
    _, exps = experiments()
    study = build_study([e for e in exps if e.name != "ctx-5"], ["train.seed"], "ctx")
    row = rows_by(summarise(study, ["ssim"], f"{K}=0"), "ssim")[f"{K}=1"]
    half = T_975[1] * math.sqrt(0.0002) / math.sqrt(2)
    assert (row.n_seeds, row.n_pairs, row.diff) == (2, 2, pytest.approx(0.1))
    assert (row.diff_lo, row.diff_hi) == (pytest.approx(0.1 - half, abs=1e-6), pytest.approx(0.1 + half, abs=1e-6))
    assert row.note == "unpaired seeds left out: 2"


def test_fewer_than_two_paired_seeds_give_a_difference_but_no_interval():
    """All experiments: lr-1 is a third configuration trained with seed 1 only."""
    _, exps = experiments()
    study = build_study(exps, ["train.seed"])
    assert study.grid_keys == [K, "train.lr_g"] and len(study.configs) == 3
    lr = f"{K}=0, train.lr_g=0.0001"
    row = rows_by(summarise(study, ["ssim"], f"{K}=0, train.lr_g=0.0002"), "ssim")[lr]
    assert (row.n_pairs, row.diff, row.diff_lo, row.diff_hi) == (1, pytest.approx(0.0), None, None)
    assert row.note == "interval null: 1 paired seed, needs >= 2; unpaired seeds left out: 2,3"
    alone = [e for e in exps if e.name in ("lr-1", "ctx-5", "ctx-6")]            # no seed in common
    row = rows_by(summarise(build_study(alone, ["train.seed"]), ["ssim"], f"{K}=1, train.lr_g=0.0002"), "ssim")[lr]
    assert row.diff is None and row.n_pairs == 0 and row.note.startswith("no seed in common with the baseline")


def test_a_study_can_name_several_studies_and_run_says_which_it_reused(capsys):
    """A grid over lr_g that reuses ctx's finished runs at the baseline lr: `show` needs both names
    (the reused runs keep theirs), and `run` prints the show command with both."""
    _, exps = experiments()
    assert {e.name for runs in build_study(exps, ["train.seed"], ["ctx", "lr"]).runs.values()
            for e in runs.values()} == {"lr-1", *(f"ctx-{i}" for i in range(1, 7))}
    with pytest.raises(InputError, match="named nope-<i> or other-<i>"):
        build_study(exps, ["train.seed"], ["nope", "other"])
    run_dvc, _ = fake_dvc(doc())
    assert compare.run([f"{K}=0"], "1,2,3", name="again", params_path=str(PARAMS), run_dvc=run_dvc) == 0
    assert "compare them: ctsynth compare show --name again --name ctx" in capsys.readouterr().out


def test_failed_experiments_never_count_though_dvc_shows_metrics_for_them():
    _, exps = experiments()
    assert next(e for e in exps if e.name == "big-1").metrics                # the baseline's, not its own
    study = build_study(exps, ["train.seed"])
    assert all(values[K] != 5 for values in study.configs.values())
    assert "big-1" not in {e.name for runs in study.runs.values() for e in runs.values()}


def test_a_newer_twin_replaces_an_older_experiment_of_the_same_config_and_seed():
    _, exps = experiments()
    ctx1 = next(e for e in exps if e.name == "ctx-1")
    twin = compare.Experiment("ctx-9", "f" * 40, "success", dict(ctx1.params), {"ssim": 0.5}, "2099-01-01T00:00:00")
    study = build_study([*exps, twin], ["train.seed"], "ctx")
    assert study.runs[f"{K}=0"]["1"].name == "ctx-9" and study.duplicates == ["ctx-1"]


def test_the_baseline_defaults_to_the_workspace_config_and_can_be_chosen():
    workspace, exps = experiments()
    study = build_study(exps, ["train.seed"], "ctx")
    assert pick_baseline(study, [], workspace) == f"{K}=0"
    assert pick_baseline(study, [], {**workspace, K: 1}) == f"{K}=1"
    assert pick_baseline(study, [f"{K}=1"], workspace) == f"{K}=1"
    row = rows_by(summarise(study, ["ssim"], f"{K}=1"), "ssim")[f"{K}=0"]
    assert row.diff == pytest.approx(-0.096667, abs=1e-6)


def test_baseline_errors():
    workspace, exps = experiments()
    study = build_study(exps, ["train.seed"], "ctx")
    with pytest.raises(InputError, match="matches no configuration"):
        pick_baseline(study, [f"{K}=3"], workspace)
    with pytest.raises(InputError, match="not a param that differs between the configurations"):
        pick_baseline(study, ["train.lr_g=0.0002"], workspace)
    with pytest.raises(InputError, match="matches 2 configurations"):
        pick_baseline(build_study(exps, ["train.seed"]), [f"{K}=0"], workspace)


def test_no_experiments_and_a_seed_key_that_does_not_vary_are_clear_errors():
    _, exps = experiments()
    with pytest.raises(InputError, match="no finished experiments named nope-<i>"):
        build_study(exps, ["train.seed"], "nope")
    with pytest.raises(InputError, match="no finished experiments"):
        build_study([e for e in exps if e.state == "failed"], ["train.seed"])
    with pytest.raises(InputError, match=r"--seed-key seed: does not vary over the 6 experiments \(all 42\)"):
        build_study(exps, ["seed"], "ctx")


def test_show_prints_the_table_and_writes_csv_and_markdown(tmp_path, capsys):
    run_dvc, _ = fake_dvc(doc())
    rows = compare.show(name="ctx", metrics="ssim,mae_hu", out=str(tmp_path / "cmp.csv"), run_dvc=run_dvc,
                        test=True)
    assert [(r.metric, r.config) for r in rows][:2] == [("ssim", f"{K}=0"), ("ssim", f"{K}=1")]
    printed = capsys.readouterr().out
    assert f"baseline: {K}=0" in printed and "0.09667" in printed and "[0.06798, 0.1254]" in printed
    table = pd.read_csv(tmp_path / "cmp.csv")
    assert list(table.columns) == list(compare.COLUMNS) and len(table) == 4
    assert table.loc[1, "diff_lo"] == pytest.approx(0.067981, abs=1e-5)
    compare.show(name="ctx", baseline=[f"{K}=1"], out=str(tmp_path / "cmp.md"), run_dvc=run_dvc, test=True)
    md = (tmp_path / "cmp.md").read_text()
    assert "| metric | config |" in md and f"baseline: {K}=1" in md
    with pytest.raises(InputError, match="bogus not among the experiments' numeric metrics"):
        compare.show(name="ctx", metrics="ssim,bogus", run_dvc=run_dvc, test=True)
    with pytest.raises(InputError, match="write .csv or .md"):
        compare.show(name="ctx", out=str(tmp_path / "cmp.txt"), run_dvc=run_dvc)


def with_validation(document: list) -> list:
    """The fixture with a validation metric beside each experiment's headline: val_ssim = ssim - 0.01."""
    document = copy.deepcopy(document)

    def add(data):
        metrics = (data or {}).get("metrics") or {}
        head = metrics.get("reports/headline.json", {}).get("data")
        if head and "ssim" in head:
            metrics["reports/validation.json"] = {"data": {"val_ssim": round(head["ssim"] - 0.01, 6)}}

    def walk(node):
        if isinstance(node, dict):
            if "metrics" in node:
                add(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(document)
    return document


def test_show_hides_the_test_metrics_unless_asked(capsys):
    """Defaults are chosen on validation: `show` lists val_* metrics only; a test metric needs --test."""
    run_dvc, _ = fake_dvc(with_validation(doc()))
    rows = compare.show(name="ctx", run_dvc=run_dvc)
    assert {r.metric for r in rows} == {"val_ssim"}
    assert "ssim " not in capsys.readouterr().out.replace("val_ssim", "")
    assert {r.metric for r in compare.show(name="ctx", run_dvc=run_dvc, test=True)} == {"val_ssim", "ssim", "mae_hu",
                                                                                      "n_test_cases"}
    with pytest.raises(InputError, match=r"--metrics: ssim: test-patient metric\(s\), shown only with --test"):
        compare.show(name="ctx", metrics="val_ssim,ssim", run_dvc=run_dvc)
    run_plain, _ = fake_dvc(doc())                                  # no validation metric at all
    with pytest.raises(InputError, match="not among the experiments' numeric metrics .*test metrics: --test"):
        compare.show(name="ctx", run_dvc=run_plain)


def test_run_dry_run_queues_only_the_missing_points(capsys):
    """Seeds 1-4 over the recorded ctx grid: six points are finished, ctx-7 and ctx-8 are new."""
    run_dvc, calls = fake_dvc(doc())
    assert compare.run([f"{K}=0,1"], "1,2,3,4", name="ctx", jobs=2, dry_run=True, params_path=str(PARAMS),
                       run_dvc=run_dvc) == 0
    assert calls == [["exp", "show", "--json"]]
    out = capsys.readouterr().out
    assert "8 grid points (2 model.context_slices x 4 seeds): 6 finished, 0 queued or running, 2 to queue" in out
    assert "done    ctx-5: model.context_slices=1 train.seed=2" in out
    queued = [line.strip() for line in out.splitlines() if line.strip().startswith("dvc ")]
    assert queued == ["dvc exp run --queue -n ctx-7 -S model.context_slices=0 -S train.seed=4",
                      "dvc exp run --queue -n ctx-8 -S model.context_slices=1 -S train.seed=4",
                      "dvc queue start -j 2"]


def test_a_point_matches_only_an_experiment_with_exactly_its_params():
    """The workspace changed since (train.iterations): no finished experiment matches any more."""
    workspace, exps = experiments()
    points = compare.grid_points({K: ["0"]}, [1], ["train.seed"])
    assert [p.action for p in compare.plan(points, workspace, exps, "ctx")] == ["done"]
    steps = compare.plan(points, {**workspace, "train.iterations": 10}, exps, "ctx")
    assert [(s.action, s.name) for s in steps] == [("queue", "ctx-7")]


def _with_states(states: dict) -> list:
    """The fixture with the executor state of some experiments changed (failed: with DVC's error)."""
    d = copy.deepcopy(doc())
    for exp in d[1]["experiments"]:
        if exp["name"] in states:
            exp["executor"]["state"] = states[exp["name"]]
            exp["revs"][0]["error"] = {"msg": "Experiment run failed"} if states[exp["name"]] == "failed" else None
    return d


def test_run_requeues_failed_points_waits_for_queued_ones_and_names_failures(capsys):
    """ctx-6 failed (queued again as ctx-7), ctx-5 is still queued (waited for, not queued twice);
    then ctx-5 finishes and ctx-7 fails: exit 1, its name and the log command."""
    before = _with_states({"ctx-5": "queued", "ctx-6": "failed"})
    after = _with_states({"ctx-6": "failed"})                                 # ctx-5 finished
    new = copy.deepcopy(next(e for e in after[1]["experiments"] if e["name"] == "ctx-6"))
    new["name"] = new["revs"][0]["name"] = "ctx-7"
    new["revs"][0]["rev"] = "7" * 40
    after[1]["experiments"].append(new)                                       # ... and ctx-7 failed
    run_dvc, calls = fake_dvc(before, after)
    code = compare.run([f"{K}=0,1"], "1,2,3", name="ctx", params_path=str(PARAMS), run_dvc=run_dvc, poll_s=0)
    assert code == 1
    assert ["exp", "run", "--queue", "-n", "ctx-7", "-S", f"{K}=1", "-S", "train.seed=3"] in calls
    assert sum(c[:3] == ["exp", "run", "--queue"] for c in calls) == 1
    assert ["queue", "start", "-j", "1"] in calls
    err = capsys.readouterr().err
    assert "1 experiment(s) failed: ctx-7" in err and "dvc queue logs ctx-7" in err


def test_waiting_restarts_a_queue_whose_workers_stopped_and_then_gives_up():
    """Workers gone, ctx-5 still queued: the queue is started again (restarts times), then an error."""
    run_dvc, calls = fake_dvc(_with_states({"ctx-5": "queued"}), workers="Worker status: 0 active, 0 idle")
    with pytest.raises(InputError, match="queued: ctx-5 \\(restarted the queue, it stopped again\\)"):
        compare.wait({"ctx-5"}, run_dvc, poll_s=0, jobs=2, restarts=2)
    assert calls.count(["queue", "start", "-j", "2"]) == 2


def test_waiting_resumes_after_a_restart():
    """Workers gone with ctx-5 queued; after one restart it finishes: no error, one restart."""
    queued = _with_states({"ctx-5": "queued"})
    run_dvc, calls = fake_dvc(queued, queued, queued, doc(), workers="Worker status: 0 active, 0 idle")
    assert compare.wait({"ctx-5"}, run_dvc, poll_s=0, jobs=2) == []
    assert calls.count(["queue", "start", "-j", "2"]) == 1


def test_waiting_names_a_running_experiment_whose_worker_died():
    """Shown running with no worker alive: restarting cannot help (DVC keeps the task active)."""
    run_dvc, calls = fake_dvc(_with_states({"ctx-5": "running"}), workers="Worker status: 0 active, 0 idle")
    with pytest.raises(InputError, match="shown running with no worker left \\(it died\\): ctx-5"):
        compare.wait({"ctx-5"}, run_dvc, poll_s=0)
    assert ["queue", "start", "-j", "1"] not in calls


def test_run_follows_its_experiments_on_their_commit_when_head_moves_while_they_run(capsys):
    """Seen on a real grid: a commit made while the queue ran hid the finished experiments from
    `dvc exp show` (HEAD's only), and waiting called them dead. The wait reads the queued commit."""
    queued_on = doc()[1]["rev"]
    before = _with_states({"ctx-5": "queued"})
    moved = [copy.deepcopy(doc()[0]), {**copy.deepcopy(doc()[1]), "rev": "f" * 40, "experiments": []}]
    calls: list = []
    shown = iter([before])

    def run_dvc(args):
        calls.append(args)
        if args[:2] == ["exp", "show"]:
            if "--rev" not in args:                                   # HEAD: the first call, then a new commit
                return json.dumps(next(shown, moved))
            assert args[args.index("--rev") + 1] == queued_on
            return json.dumps(doc())                                  # on their commit: ctx-5 finished
        return "Worker status: 0 active, 0 idle" if args[:2] == ["queue", "status"] else ""
    assert compare.run([f"{K}=0,1"], "1,2,3", name="ctx", params_path=str(PARAMS), run_dvc=run_dvc, poll_s=0) == 0
    assert ["exp", "show", "--json", "--rev", queued_on] in calls
    assert "all 6 grid points finished" in capsys.readouterr().out


def test_waiting_names_an_experiment_no_longer_listed():
    run_dvc, _ = fake_dvc(doc(), workers="Worker status: 0 active, 0 idle")
    with pytest.raises(InputError, match="not listed by `dvc exp show --rev abc`: gone-1 \\(removed\\?\\)"):
        compare.wait({"gone-1"}, run_dvc, poll_s=0, rev="abc")


def test_run_refuses_unknown_keys_invalid_values_and_bad_options_before_queueing():
    run_dvc, calls = fake_dvc(doc())
    with pytest.raises(InputError, match="no key model.context_slice "):
        compare.run(["model.context_slice=0,1"], "1,2", params_path=str(PARAMS), run_dvc=run_dvc)
    with pytest.raises(InputError, match="no key train.sed"):
        compare.run([f"{K}=0,1"], "1,2", seed_key="train.sed", params_path=str(PARAMS), run_dvc=run_dvc)
    with pytest.raises(ConfigError, match="model.context_slices=99: .*must be in 0..8") as e:
        compare.run([f"{K}=0,99"], "1,2,3", params_path=str(PARAMS), run_dvc=run_dvc)
    assert len(e.value.problems) == 1                       # once per configuration, not per seed
    with pytest.raises(InputError) as e:
        compare.run([f"{K}=0,1", f"{K}=2", "train.lr_g"], "1,-2", params_path=str(PARAMS), run_dvc=run_dvc)
    assert len(e.value.problems) == 3                       # every problem at once
    with pytest.raises(InputError, match="--name"):
        compare.run([f"{K}=0,1"], "1,2", name="a b", params_path=str(PARAMS), run_dvc=run_dvc)
    assert calls == []


def test_values_split_and_parse_as_dvc_reads_them():
    assert compare.split_values("a,[1, 2],{x: 1, y: 2},'c,d'") == ["a", "[1, 2]", "{x: 1, y: 2}", "'c,d'"]
    assert [compare.parse_value(v) for v in ("1", "true", "2e-4", "null", "resize")] == [1, True, 2e-4, None,
                                                                                         "resize"]
    flat = compare.apply_point({"split.cases": None, "train.lr_g": 2e-4}, {"train.lr_g": "1e-4",
                                                                           "split.cases": "{train: [a]}"})
    assert flat == {"train.lr_g": 1e-4, "split.cases.train": ["a"]}


def test_the_cli_wires_both_verbs():
    from ctsynth.cli import _compare_run, _compare_show, build_parser

    args = build_parser().parse_args(["compare", "run", "--set", f"{K}=0,1", "--seeds", "1,2", "--dry-run"])
    assert args.func is _compare_run and args.set == [f"{K}=0,1"] and args.seed_key == "train.seed"
    args = build_parser().parse_args(["compare", "show", "--baseline", f"{K}=0", "--out", "x.md"])
    assert args.func is _compare_show and args.baseline == [f"{K}=0"] and args.name is None


def test_parallel_jobs_share_the_cores_unless_the_user_chose(monkeypatch):
    """Each queue worker's run would start one thread per core: --jobs N splits them (set for the
    `dvc queue start` the workers inherit), and an OMP_NUM_THREADS the user set is kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert compare.share_cores(1, cores=8) is None and "OMP_NUM_THREADS" not in os.environ
    assert compare.share_cores(2, cores=8) == 4 and os.environ["OMP_NUM_THREADS"] == "4"
    assert compare.share_cores(3, cores=2) is None                  # already set: the user's (here, ours) stays
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert compare.share_cores(3, cores=2) == 1                     # never below one thread


def test_show_pools_the_experiments_of_commits_that_run_the_same_pipeline(monkeypatch):
    """A grid queued in two parts, with a docs-only commit between them: `--rev A --rev B` shows them as
    one study, exactly as if one commit held them all; commits whose pipeline differs are refused."""
    whole = doc()
    first, second = json.loads(json.dumps(whole)), json.loads(json.dumps(whole))
    first[1]["experiments"] = [e for e in whole[1]["experiments"] if e["name"] in ("ctx-1", "ctx-2", "ctx-3")]
    second[1]["experiments"] = [e for e in whole[1]["experiments"] if e["name"] in ("ctx-4", "ctx-5", "ctx-6")]
    calls = []
    run_dvc, _ = fake_dvc(first, second, calls=calls)
    checked = []
    monkeypatch.setattr(compare, "same_pipeline", checked.append)    # the git check: its own test, below
    pooled = compare.show(name="ctx", metrics="ssim", run_dvc=run_dvc, rev=["a1", "b2"], test=True)
    assert checked == [["a1", "b2"]]
    assert [c for c in calls if c[:2] == ["exp", "show"]] == [["exp", "show", "--json", "--rev", "a1"],
                                                            ["exp", "show", "--json", "--rev", "b2"]]
    one, _ = fake_dvc(whole)
    assert pooled == compare.show(name="ctx", metrics="ssim", run_dvc=one, test=True)


def test_same_pipeline_compares_the_lock_the_pipeline_and_the_params():
    files = {"a:dvc.lock": b"L", "a:dvc.yaml": b"Y", "a:params.yaml": b"P",
             "b:dvc.lock": b"L", "b:dvc.yaml": b"Y", "b:params.yaml": b"P",
             "c:dvc.lock": b"L2", "c:dvc.yaml": b"Y", "c:params.yaml": b"P2"}
    compare.same_pipeline(["a", "b"], show=files.__getitem__)
    with pytest.raises(InputError) as err:
        compare.same_pipeline(["a", "b", "c"], show=files.__getitem__)
    assert "c and a differ in dvc.lock" in str(err.value) and "c and a differ in params.yaml" in str(err.value)
