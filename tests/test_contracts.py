"""docs/contracts.md states file formats between stages; where it lists columns, the code must
write exactly those (so the document cannot drift from the code)."""
from __future__ import annotations

import re

import pandas as pd
import torch

from conftest import REPO
from corpus import write_case
from ctsynth.core.config import params_from_dict
from ctsynth.core.labels import STRUCTURES
from ctsynth.data import ingest
from ctsynth.train.distributed import Dist
from ctsynth.train.history import LOSS_NAMES, LossHistory

CONTRACTS = (REPO / "docs" / "contracts.md").read_text()


def documented_columns(label: str) -> list[str]:
    """The backticked, comma-separated list after ``label``; ``x/y/z`` and ``vox_<Structure>``
    expanded."""
    found = re.search(re.escape(label) + r"[^`]*`([^`]+)`", CONTRACTS)
    assert found, f"docs/contracts.md has no column list after {label!r}"
    cols = []
    for item in (c.strip() for c in found.group(1).split(",")):
        if "_x/y/z" in item:
            head, tail = item.split("_x/y/z")
            cols += [f"{head}_{a}{tail}" for a in "xyz"]
        elif item == "vox_<Structure>":
            cols += [f"vox_{s}" for s in STRUCTURES]
        else:
            cols.append(item)
    return cols


def test_ingest_manifest_has_the_documented_columns(tmp_path):
    write_case(tmp_path / "raw", "p1")
    params = params_from_dict({"data": {"source": "nifti", "raw_dir": str(tmp_path / "raw")}})
    ingest.run(params, tmp_path / "interim")
    written = pd.read_csv(tmp_path / "interim" / "manifest.csv")
    assert sorted(written.columns) == sorted(documented_columns("Manifest columns:"))


def test_loss_table_has_the_documented_columns(tmp_path):
    hist = LossHistory(3, Dist(False, 0, 1, torch.device("cpu")))
    for step in (1, 2, 3):
        hist.record(step, torch.full((len(LOSS_NAMES),), float(step)))
    hist.write(tmp_path / "losses.csv", 3, 3, lambda s: (1e-4, 2e-4))
    table = pd.read_csv(tmp_path / "losses.csv")
    assert list(table.columns) == documented_columns("`losses.csv`: columns")
    assert table["step"].tolist() == [1, 2, 3] and table["g_l1"].tolist() == [1.0, 2.0, 3.0]
