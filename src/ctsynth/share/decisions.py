"""Expert review decisions on synthetic cases: one JSON-lines file per reviewer.

``reviews/<reviewer>.jsonl`` (git-tracked, so the ``share`` stage can depend on it) holds one
decision per line, appended as the reviewer clicks (``ctsynth review``)::

    {"case": "synth_0003", "decision": "reject", "reason": "too similar", "comment": "",
     "reviewer": "alice", "time": "2026-12-01T20:31:07Z", "case_sha256": "9f2c..."}

The reviewer's latest line for a case is their decision. ``case_sha256`` is the case's content hash
(:func:`case_hash`: its image and label files) when it was decided: if the case has changed since
(the synthetic dataset was remade), the decision is **stale**, reported and never applied.

A file naming an unknown case, a malformed line, an unknown decision or reason, or a reviewer name
that is not the file's is an :class:`ctsynth.core.errors.InputError` naming the file and line (all
problems at once).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

from ctsynth.core.errors import InputError
from ctsynth.core.io import atomic_file

DECISIONS = ("accept", "reject")
REASONS = ("anatomy wrong", "artefact", "too similar", "other")   # a rejection names one of these
REVIEWER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FIELDS = ("case", "decision", "reason", "comment", "reviewer", "time", "case_sha256")


@dataclasses.dataclass(frozen=True)
class Decision:
    case: str
    decision: str                   # accept | reject
    reason: str | None              # one of REASONS for a rejection, None for an acceptance
    comment: str
    reviewer: str
    time: str                       # UTC, ISO 8601
    case_sha256: str

    def record(self) -> dict:
        return dataclasses.asdict(self)


def case_hash(*files: str | Path) -> str:
    """SHA-256 over the bytes of a case's files (image, then label), each prefixed by its length."""
    h = hashlib.sha256()
    for f in files:
        data = Path(f).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def check_reviewer(name: str) -> str:
    """A reviewer name is a file name: letters, digits, ``_ . -`` (no path, at most 64 characters)."""
    if not isinstance(name, str) or not REVIEWER_RE.match(name):
        raise InputError(f"reviewer {name!r}: use letters, digits, '_', '.', '-' (at most 64, not starting "
                         f"with a '.' or '-'); it names the file reviews/<reviewer>.jsonl")
    return name


def make_decision(case: str, decision: str, reason: str | None, comment: str, reviewer: str,
                  case_sha256: str) -> Decision:
    """A validated decision stamped with the current UTC time."""
    problems = _problems({"case": case, "decision": decision, "reason": reason, "comment": comment,
                          "reviewer": reviewer, "time": "now", "case_sha256": case_sha256}, reviewer)
    if problems:
        raise InputError(problems)
    return Decision(case, decision, reason if decision == "reject" else None, comment or "", reviewer,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), case_sha256)


def _problems(rec, reviewer: str) -> list[str]:
    if not isinstance(rec, dict):
        return ["not a JSON object"]
    out = []
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        out.append(f"missing field(s) {', '.join(missing)}")
    if rec.get("decision") not in DECISIONS:
        out.append(f"decision {rec.get('decision')!r}: expected one of {', '.join(DECISIONS)}")
    if rec.get("decision") == "reject" and rec.get("reason") not in REASONS:
        out.append(f"reason {rec.get('reason')!r}: a rejection names one of {', '.join(REASONS)}")
    if rec.get("decision") == "reject" and rec.get("reason") == "other" and not str(rec.get("comment") or "").strip():
        out.append("reason 'other' needs a comment")
    if "reviewer" in rec and rec["reviewer"] != reviewer:
        out.append(f"reviewer {rec['reviewer']!r} differs from the file's ({reviewer!r})")
    for key in ("case", "case_sha256", "time"):
        if key in rec and not (isinstance(rec[key], str) and rec[key]):
            out.append(f"{key}: expected a non-empty string")
    if not isinstance(rec.get("comment", ""), str):
        out.append("comment: expected a string")
    return out


def read_file(path: Path, known: set[str] | None = None) -> tuple[list[Decision], list[str]]:
    """The decisions of one reviewer file, and its problems as ``<file>:<line>: <problem>``
    (unknown cases among them when ``known`` is given)."""
    reviewer = path.name[:-len(".jsonl")]
    problems, out = [], []
    if not REVIEWER_RE.match(reviewer):
        return [], [f"{path}: the file name must be <reviewer>.jsonl with a reviewer name of letters, digits, "
                    f"'_', '.', '-'"]
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
            continue
        bad = _problems(rec, reviewer)
        if not bad and known is not None and rec["case"] not in known:
            bad = [f"case {rec['case']!r} is not a case of the synthetic dataset"]
        if bad:
            problems.extend(f"{path}:{n}: {p}" for p in bad)
            continue
        out.append(Decision(**{k: rec[k] for k in FIELDS}))
    return out, problems


def load(reviews_dir: str | Path, hashes: dict[str, str]) -> dict[str, dict[str, tuple[Decision, bool]]]:
    """Every reviewer's latest decision per case: ``{reviewer: {case: (decision, stale)}}``, where
    ``hashes`` maps each case of the dataset to its current :func:`case_hash`. Raises one
    :class:`InputError` listing every problem of every file."""
    folder = Path(reviews_dir)
    result, problems = {}, []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        decisions, bad = read_file(path, set(hashes))
        problems.extend(bad)
        latest = {d.case: d for d in decisions}             # the last line for a case wins
        result[path.name[:-len(".jsonl")]] = {c: (d, d.case_sha256 != hashes[c]) for c, d in latest.items()}
    if problems:
        raise InputError(problems)
    return result


def append(reviews_dir: str | Path, decision: Decision) -> Path:
    """Append ``decision`` to its reviewer's file, atomically (the whole file is rewritten to a
    temporary sibling and renamed, so a crash never leaves half a line)."""
    path = Path(reviews_dir) / f"{check_reviewer(decision.reviewer)}.jsonl"
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(before + json.dumps(decision.record(), ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def stale_decisions(reviews: dict[str, dict[str, tuple[Decision, bool]]]) -> list[dict]:
    """``[{reviewer, case, time}]`` of every stale decision (made on files that have changed since)."""
    return [{"reviewer": who, "case": d.case, "time": d.time}
            for who, per_case in sorted(reviews.items()) for d, stale in per_case.values() if stale]


def verdicts(reviews: dict[str, dict[str, tuple[Decision, bool]]], case: str) -> dict:
    """What the reviewers said about ``case``: counts of current accepts and rejects, stale ones."""
    acc = rej = stale = 0
    for per_case in reviews.values():
        if case not in per_case:
            continue
        d, is_stale = per_case[case]
        if is_stale:
            stale += 1
        elif d.decision == "accept":
            acc += 1
        else:
            rej += 1
    return {"accepts": acc, "rejects": rej, "stale": stale}
