"""Sharing: review decisions (ctsynth.share.decisions), the share stage and its card
(ctsynth.share.share, ctsynth.share.card) and the review web app's server side
(ctsynth.tools.review). The page itself, in a real browser: tests/test_pipeline_e2e.py."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_params
from ctsynth.core.errors import InputError
from ctsynth.share import decisions
from ctsynth.share import share as share_stage
from ctsynth.tools.review import ReviewData, create_app

CASES = ("synth_0001", "synth_0002", "synth_0003")
PATIENTS = ("ct_train_1000", "ct_train_1001", "ct_train_1002", "ct_train_1008", "ct_train_1009")   # sources, nearest
DRAW = {"rot_x_deg": 7.123, "rot_y_deg": -3.456, "rot_z_deg": 11.789, "scale_x": 1.0432, "scale_y": 0.9176,
        "scale_z": 1.0688, "shift_x_mm": 4.37, "shift_y_mm": -8.61, "shift_z_mm": 2.93, "deform_max_mm": 5.72,
        "deform_grid": "4x4x3"}


def make_synthetic(root: Path, verdicts=("pass", "pass", "withheld")) -> dict:
    """A tiny synthetic dataset as the synthesize and privacy stages leave it: 3 cases (16x16x6,
    Myo 205 and LV 500 in the MM-WHS values), manifest.csv, and the privacy stage's three files."""
    syn, reports = root / "synthetic", root / "reports"
    syn.mkdir(parents=True)
    reports.mkdir()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    rows, slices = [], []
    for i, case in enumerate(CASES):
        label = np.zeros((16, 16, 6), np.int16)
        label[4:10, 4:10, 1:5] = 205
        label[6:8, 6:8, 2:4] = 500
        image = np.where(label > 0, 300 + 10 * i, -800).astype(np.int16)
        nib.save(nib.Nifti1Image(image, affine), str(syn / f"{case}_image.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(syn / f"{case}_label.nii.gz"))
        rows.append({"case": case, "source": f"ct_train_100{i}", "draw_seed": f"1:{i}", "attempt": 1,
                     **DRAW, "image_file": f"{case}_image.nii.gz", "label_file": f"{case}_label.nii.gz",
                     "model_size": 16, "effective_spacing_x_mm": 2.0, "effective_spacing_y_mm": 2.0})
        slices += [{"case": case, "z": z, "similarity": 0.5 + 0.05 * z, "nn_case": "ct_train_1009", "nn_z": z,
                    "above": verdicts[i] != "pass" and z == 4} for z in range(1, 5)]
    pd.DataFrame(rows).to_csv(syn / "manifest.csv", index=False)
    pd.DataFrame([{"case": c, "source": r["source"], "similarity_max": 0.7, "nearest_case": "ct_train_1008",
                   "nearest_z": 3, "mask_dice_source": 0.8123, "verdict": v,
                   "reason": "" if v == "pass" else "1 slice(s) above 0.69"}
                  for c, r, v in zip(CASES, rows, verdicts)]).to_csv(reports / "privacy_cases.csv", index=False)
    pd.DataFrame(slices).to_csv(reports / "privacy_synthetic.csv", index=False)
    (reports / "privacy_synthetic.json").write_text(json.dumps({"privacy_threshold": 0.69, "rule": "withheld above "
                                                                "0.69", "distance": "in-body SSIM"}))
    (reports / "metrics.json").write_text(json.dumps({"ssim": 0.64, "mae_hu": 110.0}))
    (root / "reviews").mkdir()
    return {"synthetic": syn, "reports": reports, "reviews": root / "reviews"}


def hashes_of(syn: Path) -> dict[str, str]:
    return share_stage.case_hashes(syn, share_stage.read_manifest(syn))


def decide(paths, reviewer, case, decision, reason=None, comment=""):
    h = hashes_of(paths["synthetic"])[case]
    decisions.append(paths["reviews"], decisions.make_decision(case, decision, reason, comment, reviewer, h))


def run_share(paths, tmp_path, **share):
    params = tiny_params(share=share) if share else tiny_params()
    return share_stage.run(params, paths["synthetic"], paths["reports"], paths["reviews"],
                           paths["reports"] / "metrics.json", tmp_path / "no-model.pt", run_file=None,
                           out_dir=tmp_path / "share", out_json=tmp_path / "share.json")


# ------------------------------------------------------------------------------- decisions

def test_decisions_round_trip_latest_wins_and_a_changed_case_is_stale(tmp_path):
    paths = make_synthetic(tmp_path)
    decide(paths, "alice", "synth_0001", "reject", "artefact")
    decide(paths, "alice", "synth_0001", "accept")                       # changed her mind: the last line wins
    decide(paths, "alice", "synth_0002", "accept")
    decide(paths, "bob", "synth_0002", "reject", "other", "left atrium cut off")
    loaded = decisions.load(paths["reviews"], hashes_of(paths["synthetic"]))
    assert loaded["alice"]["synth_0001"][0].decision == "accept" and loaded["alice"]["synth_0001"][1] is False
    assert loaded["bob"]["synth_0002"][0].comment == "left atrium cut off"
    assert decisions.verdicts(loaded, "synth_0002") == {"accepts": 1, "rejects": 1, "stale": 0}
    lines = (paths["reviews"] / "alice.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["case_sha256"] == hashes_of(paths["synthetic"])[json.loads(x)["case"]]
                                   for x in lines)
    img = paths["synthetic"] / "synth_0001_image.nii.gz"          # the dataset is remade: synth_0001 changes
    nib.save(nib.Nifti1Image(np.full((16, 16, 6), 7, np.int16), np.eye(4)), str(img))
    loaded = decisions.load(paths["reviews"], hashes_of(paths["synthetic"]))
    assert loaded["alice"]["synth_0001"][1] is True and loaded["alice"]["synth_0002"][1] is False
    assert decisions.verdicts(loaded, "synth_0001") == {"accepts": 0, "rejects": 0, "stale": 1}


def test_a_broken_review_file_is_one_error_naming_every_file_and_line(tmp_path):
    paths = make_synthetic(tmp_path)
    decide(paths, "alice", "synth_0001", "accept")
    good = json.loads((paths["reviews"] / "alice.jsonl").read_text())
    bad_lines = ["{not json", json.dumps({**good, "case": "synth_9999"}),
                 json.dumps({**good, "decision": "maybe"}), json.dumps({**good, "reviewer": "mallory"}),
                 json.dumps({k: v for k, v in good.items() if k != "case_sha256"})]
    (paths["reviews"] / "alice.jsonl").write_text("\n".join([json.dumps(good)] + bad_lines) + "\n")
    (paths["reviews"] / "bob.jsonl").write_text(json.dumps({**good, "reviewer": "bob", "decision": "reject",
                                                            "reason": "nope"}) + "\n")
    with pytest.raises(InputError) as err:
        decisions.load(paths["reviews"], hashes_of(paths["synthetic"]))
    text = "\n".join(err.value.problems)
    for where in ("alice.jsonl:2: not valid JSON", "alice.jsonl:3: case 'synth_9999' is not a case",
                  "alice.jsonl:4: decision 'maybe'", "alice.jsonl:5: reviewer 'mallory' differs",
                  "alice.jsonl:6: missing field(s) case_sha256", "bob.jsonl:1: reason 'nope'"):
        assert where in text, (where, text)


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".hidden", "x" * 65, "-rf"])
def test_reviewer_names_are_plain_file_names(name):
    with pytest.raises(InputError, match="reviewer"):
        decisions.check_reviewer(name)


def test_a_decision_is_validated_before_it_is_written(tmp_path):
    with pytest.raises(InputError, match="a rejection names one of"):
        decisions.make_decision("synth_0001", "reject", None, "", "alice", "ab")
    with pytest.raises(InputError, match="'other' needs a comment"):
        decisions.make_decision("synth_0001", "reject", "other", "  ", "alice", "ab")
    accepted = decisions.make_decision("synth_0001", "accept", "artefact", "", "alice", "ab")
    assert accepted.reason is None and accepted.time.endswith("Z")      # an acceptance carries no reason


# ------------------------------------------------------------------------------- the share stage

def test_share_exports_the_privacy_passing_unrejected_cases_with_card_and_checksums(tmp_path):
    paths = make_synthetic(tmp_path)                                  # synth_0003 fails privacy
    decide(paths, "alice", "synth_0002", "reject", "anatomy wrong")
    decide(paths, "alice", "synth_0003", "accept")                     # accepted, but withheld by privacy
    counts = run_share(paths, tmp_path)
    out = tmp_path / "share"
    assert counts == {"made": 3, "passed_privacy": 2, "accepted": 1, "rejected": 1, "stale_decisions": 0,
                      "shared": 1, "share_files": 8}
    assert sorted(p.name for p in (out / "pairs").iterdir()) == ["case_0001_image.nii.gz", "case_0001_label.nii.gz"]
    labels = np.asarray(nib.load(str(out / "nnunet" / "labelsTr" / "case_0001.nii.gz")).dataobj)
    assert set(np.unique(labels)) == {0, 1, 3}                         # Myo, LV -> nnU-Net 1..K (K = 7 structures)
    dataset = json.loads((out / "nnunet" / "dataset.json").read_text())
    assert dataset["labels"]["LV"] == 3 and dataset["numTraining"] == 1
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["cases"] == ["case_0001"] and card["counts"]["shared"] == 1
    assert card["license"].startswith("UNSET") and card["selection"]["review_required"] is False
    assert card["structures"]["Myo"]["cases_present"] == 1 and card["structures"]["LV"]["hu_mean"] == 300.0
    assert card["privacy"]["similarity_shared_cases"]["n"] == 4 and card["performance"]["ssim"] == 0.64
    assert card["reviews"]["reviewers"][0]["reasons"] == {"anatomy wrong": 1}
    md = (out / "DATASET.md").read_text()
    assert "| 3 | 2 | 1 | 1 | 1 |" in md and "review NOT required" in md
    assert card["modality"] == "CT" and "in CT:" in card["intended_use"] and "mean HU (sd" in md
    from ctsynth.share.card import markdown
    mr = markdown({**card, "modality": "MR", "unit": "nu"})          # an MR card names its unit, never HU
    assert "mean nu (sd" in mr and "HU" not in mr.replace(card["description"], "").replace(card["intended_use"], "")
    sums = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    assert len((out / "SHA256SUMS").read_text().splitlines()) == 8   # 2 pairs + 3 nnU-Net + 3 documents
    report = json.loads((tmp_path / "share.json").read_text())
    assert report["shared_as"] == {"synth_0001": "case_0001"}                     # the internal key stays internal
    assert report["not_shared"]["synth_0002"] == "rejected by 1 reviewer(s)"
    assert report["not_shared"]["synth_0003"].startswith("privacy: 1 slice(s) above")


def test_share_with_required_review_needs_enough_acceptances_and_ignores_stale_ones(tmp_path):
    paths = make_synthetic(tmp_path, verdicts=("pass", "pass", "pass"))
    decide(paths, "alice", "synth_0001", "accept")
    decide(paths, "bob", "synth_0001", "accept")
    decide(paths, "alice", "synth_0002", "accept")
    decide(paths, "alice", "synth_0003", "accept")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.int16), np.eye(4)),        # synth_0003 remade: stale
             str(paths["synthetic"] / "synth_0003_label.nii.gz"))
    assert run_share(paths, tmp_path, require_review=True)["shared"] == 2
    counts = run_share(paths, tmp_path, require_review=True, min_accepts=2, license="CC-BY-4.0")
    assert counts["shared"] == 1 and counts["stale_decisions"] == 1
    report = json.loads((tmp_path / "share.json").read_text())
    assert report["shared"] == ["synth_0001"] and report["stale"][0]["case"] == "synth_0003"
    assert "accepted by 1 of the 2 reviewer(s) required" in report["not_shared"]["synth_0002"]
    card = json.loads((tmp_path / "share" / "dataset_card.json").read_text())
    assert card["license"] == "CC-BY-4.0" and card["selection"]["min_accepts"] == 2


def test_a_failed_share_leaves_the_previous_dataset_intact(tmp_path):
    paths = make_synthetic(tmp_path)
    run_share(paths, tmp_path)
    before = (tmp_path / "share" / "SHA256SUMS").read_text()
    (paths["reviews"] / "carol.jsonl").write_text('{"case": "synth_0001"}\n')
    with pytest.raises(InputError, match=r"carol.jsonl:1: missing field"):
        run_share(paths, tmp_path)
    assert (tmp_path / "share" / "SHA256SUMS").read_text() == before
    (paths["reviews"] / "carol.jsonl").unlink()
    pd.read_csv(paths["reports"] / "privacy_cases.csv").iloc[:2].to_csv(paths["reports"] / "privacy_cases.csv",
                                                                         index=False)
    with pytest.raises(InputError, match=r"unscreened: \['synth_0003'\]"):     # privacy results of another dataset
        run_share(paths, tmp_path)
    assert (tmp_path / "share" / "SHA256SUMS").read_text() == before


def _every_byte(path: Path) -> bytes:
    """A file's bytes, and for a gzipped file its decompressed bytes too (voxels included)."""
    import gzip

    raw = path.read_bytes()
    return raw + (gzip.decompress(raw) if path.name.endswith(".gz") else b"")


def test_the_shared_folder_names_no_patient_no_internal_case_and_no_draw(tmp_path):
    """Every file of data/share, searched byte by byte (decompressed too), holds none of the patient ids
    the synthetic dataset knows, no internal case name and no draw parameter (names or values); the
    NIfTI files are centred on the world origin and their gzip streams carry no file name."""
    paths = make_synthetic(tmp_path, verdicts=("pass", "pass", "pass"))
    decide(paths, "alice", "synth_0002", "accept")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.int16), np.diag([2.0, 2.0, 3.0, 1.0])),   # a stale decision
             str(paths["synthetic"] / "synth_0002_label.nii.gz"))
    assert run_share(paths, tmp_path)["shared"] == 3
    out = tmp_path / "share"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 3 * 4 + 5                          # + card (json, md), manifest, checksums, dataset.json
    internal = pd.read_csv(paths["synthetic"] / "manifest.csv")
    internal_columns = {"draw_seed", "attempt", "nearest_case", "nearest_z", "mask_dice_source", "similarity_max"}
    forbidden = set(PATIENTS) | set(CASES) | set(DRAW) | internal_columns | {str(v) for v in DRAW.values()}
    for path in files:
        data = _every_byte(path).lower()
        hits = [f for f in forbidden if f.lower().encode() in data or f.lower() in path.name.lower()]
        assert not hits, (path.relative_to(out), hits)

    def keys(obj):
        return set(obj) | {k for v in obj.values() for k in keys(v)} if isinstance(obj, dict) else \
            {k for v in obj for k in keys(v)} if isinstance(obj, list) else set()
    card_keys = keys(json.loads((out / "dataset_card.json").read_text()))
    assert not card_keys & (set(internal.columns) - {"case"}), card_keys & set(internal.columns)
    assert not set(pd.read_csv(out / "manifest.csv").columns) & (set(internal.columns) - set(share_stage.SHARED_COLUMNS)
                                                                 - {"case", "image_file", "label_file"})
    for image in (out / "pairs").glob("*.nii.gz"):
        assert image.read_bytes()[3] & 0x08 == 0                                   # gzip FNAME flag unset
        img = nib.load(str(image))
        centre = img.affine @ np.array([7.5, 7.5, 2.5, 1.0])
        assert np.allclose(centre[:3], 0) and np.allclose(np.abs(np.diag(img.affine))[:3], [2, 2, 3])
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.case) == ["case_0001", "case_0002", "case_0003"]
    assert {"accepts", "ml_Myo", "ml_LV", "effective_spacing_x_mm"} <= set(manifest.columns)
    report = json.loads((tmp_path / "share.json").read_text())
    assert sorted(report["shared_as"]) == list(CASES) and sorted(report["shared_as"].values()) == list(manifest.case)
    assert report["stale"][0]["case"] == "synth_0002"                               # internal: names it
    run_share(paths, tmp_path)
    assert (out / "SHA256SUMS").read_text() == (tmp_path / "share" / "SHA256SUMS").read_text()
    again = tmp_path / "again"
    share_stage.run(tiny_params(), paths["synthetic"], paths["reports"], paths["reviews"],
                    paths["reports"] / "metrics.json",
               tmp_path / "no-model.pt", run_file=None, out_dir=again, out_json=tmp_path / "again.json")
    same = [p.relative_to(again).as_posix() for p in again.rglob("*.nii.gz")
            if p.read_bytes() == (out / p.relative_to(again)).read_bytes()]
    assert len(same) == 12                                                           # byte for byte reproducible


def test_the_share_stage_refuses_to_export_a_file_that_names_a_patient(tmp_path):
    paths = make_synthetic(tmp_path)
    run_share(paths, tmp_path)
    before = (tmp_path / "share" / "SHA256SUMS").read_text()
    with pytest.raises(InputError) as err:                                          # the dataset's name is a param
        run_share(paths, tmp_path, name="ct_train_1001 follow-up")
    text = "\n".join(err.value.problems)
    assert "refusing to export" in text
    for where in ("dataset_card.json: names ct_train_1001", "DATASET.md: names ct_train_1001",
                  "nnunet/dataset.json: names ct_train_1001"):
        assert where in text, text
    assert (tmp_path / "share" / "SHA256SUMS").read_text() == before


def test_identifier_search_finds_whole_tokens_in_paths_bytes_and_nifti_headers(tmp_path):
    root = tmp_path / "root"
    (root / "pairs").mkdir(parents=True)
    (root / "notes.txt").write_text("made from CT_TRAIN_1004; ct_train_10040 and xct_train_1004 are other words; "
                                    "7 structures, 12 cases")
    (root / "pairs" / "p7_image.txt").write_text("nothing")
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["descrip"] = b"from ct_train_1005"
    nib.save(img, str(root / "pairs" / "a.nii.gz"))
    problems = share_stage.identifier_problems(root, {"ct_train_1004", "ct_train_1005", "7", "12", "p7"})
    assert problems == ["notes.txt: names CT_TRAIN_1004", "pairs/a.nii.gz: names ct_train_1005",
                        "pairs/p7_image.txt: names p7"]                              # short ids: paths only
    assert share_stage.identifier_problems(root, set()) == []


def test_the_share_stage_refuses_bad_params():
    from ctsynth.core.config import params_from_dict
    from ctsynth.core.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        params_from_dict({"share": {"min_accepts": 0, "name": " "}})
    assert "share.min_accepts: must be >= 1" in str(err.value) and "share.name" in str(err.value)


# ------------------------------------------------------------------------------- the review app

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The review app on a real uvicorn server on 127.0.0.1, in a thread."""
    import uvicorn

    from ctsynth.core.labels import MMWHS_LABEL_MAP

    paths = make_synthetic(tmp_path)
    data = ReviewData(paths["synthetic"], paths["reviews"], "alice", dict(MMWHS_LABEL_MAP),
                      privacy_dir=paths["reports"])
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(data), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", paths
    srv.should_exit = True
    thread.join(5)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    return _get(req)


def test_the_review_app_serves_cases_images_and_saves_decisions(server):
    base, paths = server
    status, kind, page = _get(base + "/")
    assert status == 200 and b"ctsynth review" in page
    assert b"http://" not in page and b"https://" not in page            # offline: no CDN, no external request
    summary = json.loads(_get(base + "/api/cases")[2])
    assert [c["case"] for c in summary["cases"]] == list(CASES) and summary["reviewed"] == 0
    assert summary["cases"][2]["privacy"] == "withheld"
    detail = json.loads(_get(base + "/api/cases/synth_0001")[2])
    assert detail["shape"] == [16, 16, 6] and detail["draw"]["source"] == "ct_train_1000"
    assert [s["z"] for s in detail["slices"]] == [1, 2, 3, 4]
    status, kind, png = _get(base + "/api/cases/synth_0001/coronal/8.png?overlay=true")
    assert status == 200 and kind == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(_post(base + "/api/cases/synth_0002/decision",
                             {"decision": "reject", "reason": "too similar", "comment": "like its source"})[2])
    assert saved["reviewed"] == 1 and saved["cases"][1]["decision"] == "reject"
    line = json.loads((paths["reviews"] / "alice.jsonl").read_text())
    assert line["case"] == "synth_0002" and line["reason"] == "too similar" and line["reviewer"] == "alice"
    assert line["case_sha256"] == hashes_of(paths["synthetic"])["synth_0002"]


@pytest.mark.parametrize("path", ["/api/cases/..%2F..%2Fetc%2Fpasswd", "/api/cases/synth_9999/axial/1.png",
                                  "/api/cases/synth_0001/oblique/1.png", "/api/cases/synth_0001/axial/6.png",
                                  "/api/cases/synth_0001/axial/-1.png", "/api/nearest/synth_0001/2.png"])
def test_the_review_app_refuses_what_is_not_in_the_dataset(server, path):
    status, _, _ = _get(server[0] + path)     # the last: no processed store given, so no training slice to show
    assert status == 404


def test_the_review_app_refuses_an_invalid_decision_and_writes_nothing(server):
    base, paths = server
    status, _, body = _post(base + "/api/cases/synth_0001/decision", {"decision": "reject", "reason": "ugly"})
    assert status == 422 and b"a rejection names one of" in body
    assert _post(base + "/api/cases/nope/decision", {"decision": "accept"})[0] == 404
    assert not (paths["reviews"] / "alice.jsonl").exists()
