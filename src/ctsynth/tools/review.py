"""``ctsynth review``: a local web page on which an expert accepts or rejects synthetic cases.

For each case of the synthetic dataset the page shows the CT and its mask in axial, coronal and
sagittal views with slice sliders, the privacy screening (verdict, the similarity of each slice to
its nearest training slice, that training slice beside the synthetic one) and the draw that made
the case (``manifest.csv``). The expert accepts, or rejects with a reason (anatomy wrong, artefact,
too similar, other + comment), by click or keyboard; each decision is appended at once, atomically,
to ``reviews/<reviewer>.jsonl`` (:mod:`ctsynth.share.decisions`) with the case's content hash, so it
survives a reload or a restart and a decision about a case that has changed since shows as stale.

Served by FastAPI + uvicorn (both come with MLflow) on 127.0.0.1 unless ``--host`` says otherwise;
the page is one self-contained file (``static/review.html``: no CDN, no external request). Case
ids from the browser are looked up in the dataset, never used as paths; view names and slice
numbers are validated.
"""
from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctsynth.core.errors import InputError
from ctsynth.core.io import canonical
from ctsynth.core.labels import STRUCTURE_COLOURS, STRUCTURES
from ctsynth.data.masks import map_labels
from ctsynth.share import decisions
from ctsynth.share.share import case_hashes, read_manifest

log = logging.getLogger("ctsynth.tools.review")

VIEWS = ("axial", "coronal", "sagittal")
PAGE = Path(__file__).with_name("static") / "review.html"
DISPLAY_PX = 288                                   # longest side of a rendered view, pixels
DRAW_COLUMNS = ("source", "draw_seed", "attempt", "contrast_hu")


class ReviewData:
    """The synthetic dataset as the page sees it: cases, their files and hashes, privacy results,
    the training slices they are compared with, and this reviewer's decisions."""

    def __init__(self, synthetic_dir, reviews_dir, reviewer: str, label_map: dict[int, str],
                 hu_window=(-1000.0, 1000.0), privacy_dir=None, *, processed_dir=None):
        self.synthetic_dir, self.reviews_dir = Path(synthetic_dir), Path(reviews_dir)
        self.reviewer = decisions.check_reviewer(reviewer)
        self.manifest = read_manifest(self.synthetic_dir).set_index("case", drop=False)
        self.hashes = case_hashes(self.synthetic_dir, self.manifest.reset_index(drop=True))
        self.window = (float(hu_window[0]), float(hu_window[1]))
        self.label_map = dict(label_map)
        privacy_dir = Path(privacy_dir) if privacy_dir else None
        self.cases_table = _read_optional(privacy_dir, "privacy_cases.csv")
        self.slices_table = _read_optional(privacy_dir, "privacy_synthetic.csv")
        self.store = None
        if processed_dir and (Path(processed_dir) / "meta.json").is_file():
            from ctsynth.data.store import ProcessedStore
            self.store = ProcessedStore(processed_dir)
            self.window = tuple(float(v) for v in self.store.meta["hu_window"])
        decisions.load(self.reviews_dir, self.hashes)               # refuse a broken review file before serving

    # ------------------------------------------------------------------ cases and decisions
    def case(self, case: str) -> pd.Series:
        """The manifest row of ``case``; KeyError for an id that is not a case of the dataset."""
        if not isinstance(case, str) or case not in self.hashes:
            raise KeyError(case)
        return self.manifest.loc[case]

    def my_decisions(self) -> dict[str, tuple[decisions.Decision, bool]]:
        return decisions.load(self.reviews_dir, self.hashes).get(self.reviewer, {})

    def summary(self) -> dict:
        """Every case with its privacy verdict and this reviewer's decision; the progress counts."""
        mine = self.my_decisions()
        rows = []
        for case in self.manifest.case:
            priv = self._privacy_row(case)
            d, stale = mine.get(case, (None, False))
            rows.append({"case": case, "source": self.manifest.loc[case, "source"],
                         "privacy": priv.get("verdict", "unscreened"), "privacy_reason": priv.get("reason") or "",
                         "similarity_max": priv.get("similarity_max"),
                         "decision": None if d is None else d.decision, "reason": None if d is None else d.reason,
                         "comment": "" if d is None else d.comment, "stale": bool(stale)})
        reviewed = sum(r["decision"] is not None and not r["stale"] for r in rows)
        return {"reviewer": self.reviewer, "reasons": list(decisions.REASONS), "cases": rows,
                "reviewed": reviewed, "total": len(rows)}

    def decide(self, case: str, decision: str, reason: str | None, comment: str) -> dict:
        """Record a decision on ``case`` (validated; the case re-hashed now) and return the summary."""
        row = self.case(case)
        self.hashes[case] = decisions.case_hash(self.synthetic_dir / row.image_file,
                                                self.synthetic_dir / row.label_file)
        decisions.append(self.reviews_dir, decisions.make_decision(case, decision, reason, comment, self.reviewer,
                                                     self.hashes[case]))
        return self.summary()

    def _privacy_row(self, case: str) -> dict:
        if self.cases_table is None:
            return {}
        hit = self.cases_table[self.cases_table.case == case]
        return {} if hit.empty else {k: _plain(v) for k, v in hit.iloc[0].items()}

    def detail(self, case: str) -> dict:
        """What the page shows beside the views: shape, spacing, the draw, per-slice similarity."""
        row = self.case(case)
        image, _, spacing = self.volume(case)
        draw = {k: _plain(row[k]) for k in row.index if k not in ("case", "image_file", "label_file")}
        sims = []
        if self.slices_table is not None:
            mine = self.slices_table[self.slices_table.case == case].sort_values("z")
            sims = [{"z": int(r.z), "similarity": float(r.similarity), "nn_case": str(r.nn_case),
                     "nn_z": int(r.nn_z), "above": bool(r.above)} for r in mine.itertuples()]
        return {"case": case, "shape": list(image.shape), "spacing": [round(float(s), 3) for s in spacing],
                "draw": draw, "privacy": self._privacy_row(case), "slices": sims,
                "window": list(self.window), "has_training_slices": self.store is not None,
                "legend": [{"structure": s, "rgb": STRUCTURE_COLOURS[i].tolist()} for i, s in enumerate(STRUCTURES, 1)]}

    # ------------------------------------------------------------------ images
    @functools.lru_cache(maxsize=8)  # noqa: B019 - one ReviewData per server; a few volumes in memory
    def volume(self, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(HU, structure index, spacing mm) of ``case``, canonical RAS (X, Y, Z)."""
        row = self.case(case)
        img = canonical(nib.load(str(self.synthetic_dir / row.image_file)))
        lab = canonical(nib.load(str(self.synthetic_dir / row.label_file)))
        index = map_labels(np.asanyarray(lab.dataobj), self.label_map, row.label_file, unknown="background")[0]
        return (np.asarray(img.dataobj, np.float32), index,
                np.asarray(img.header.get_zooms()[:3], float))

    def view_png(self, case: str, view: str, index: int, overlay: bool) -> bytes:
        """One slice of ``case`` as PNG, radiological display (anterior / superior up, patient right
        on the left), at the physical aspect; ``overlay``: the mask in colour over the CT."""
        if view not in VIEWS:
            raise KeyError(view)
        image, labels, spacing = self.volume(case)
        axis = {"axial": 2, "coronal": 1, "sagittal": 0}[view]
        if not 0 <= index < image.shape[axis]:
            raise IndexError(f"{view} slice {index} outside 0..{image.shape[axis] - 1}")
        cut = {"axial": lambda v: v[::-1, ::-1, index].T,          # rows: y (anterior up); cols: x (right left)
               "coronal": lambda v: v[::-1, index, ::-1].T,        # rows: z (superior up); cols: x
               "sagittal": lambda v: v[index, ::-1, ::-1].T}[view]  # rows: z (superior up); cols: y (anterior left)
        rows_mm, cols_mm = {"axial": (spacing[1], spacing[0]), "coronal": (spacing[2], spacing[0]),
                            "sagittal": (spacing[2], spacing[1])}[view]
        rgb = self._rgb(cut(image), cut(labels) if overlay else None)
        return _png(rgb, rows_mm, cols_mm)

    def training_png(self, case: str, z: int) -> bytes:
        """The training slice nearest to slice ``z`` of ``case`` (as the privacy stage found it), from
        the processed store, at the store's size."""
        if self.store is None or self.slices_table is None:
            raise KeyError("no training slices (processed store or privacy results missing)")
        self.case(case)
        hit = self.slices_table[(self.slices_table.case == case) & (self.slices_table.z == int(z))]
        if hit.empty:
            raise KeyError(f"{case} z {z}: not screened")
        nn_case, nn_z = str(hit.iloc[0].nn_case), int(hit.iloc[0].nn_z)
        slices = self.store.slices
        rows = np.flatnonzero((slices.case.to_numpy() == nn_case) & (slices.z.to_numpy() == nn_z))
        if not rows.size:
            raise KeyError(f"{nn_case} z {nn_z}: not in the processed store")
        unit = np.asarray(self.store.images[rows[0]], np.float32)               # display orientation, [-1, 1]
        lo, hi = self.window
        return _png(self._rgb(unit * 0.5 * (hi - lo) + 0.5 * (hi + lo), None), 1.0, 1.0)

    def _rgb(self, hu: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        lo, hi = self.window
        grey = np.clip((hu - lo) / (hi - lo), 0, 1)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        if labels is not None:
            colour = STRUCTURE_COLOURS[np.clip(labels, 0, len(STRUCTURES))].astype(np.float32) / 255.0
            on = (labels > 0)[..., None]
            rgb = np.where(on, 0.55 * colour + 0.45 * rgb, rgb)
        return (rgb * 255).round().astype(np.uint8)


def _png(rgb: np.ndarray, rows_mm: float, cols_mm: float) -> bytes:
    from PIL import Image

    h_mm, w_mm = rgb.shape[0] * rows_mm, rgb.shape[1] * cols_mm
    scale = DISPLAY_PX / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    buf = io.BytesIO()
    Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def _read_optional(folder: Path | None, name: str) -> pd.DataFrame | None:
    if folder is None or not (folder / name).is_file():
        return None
    return pd.read_csv(folder / name, dtype={"case": str, "nn_case": str, "nearest_case": str, "source": str})


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# ---------------------------------------------------------------------------- the web app

def create_app(data: ReviewData):
    """The FastAPI app: the page, the case list, a case's detail and images, decisions."""
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    app = FastAPI(title="ctsynth review", docs_url=None, redoc_url=None, openapi_url=None)

    def lookup(fn, *args):
        try:
            return fn(*args)
        except (KeyError, IndexError) as e:
            raise HTTPException(status_code=404, detail=str(e).strip("'\"")) from None

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    @app.get("/api/cases")
    def cases():
        return data.summary()

    @app.get("/api/cases/{case}")
    def case_detail(case: str):
        return lookup(data.detail, case)

    @app.get("/api/cases/{case}/{view}/{index}.png")
    def view_png(case: str, view: str, index: int, overlay: bool = False):
        png = lookup(data.view_png, case, view, index, overlay)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/nearest/{case}/{z}.png")
    def nearest_png(case: str, z: int):
        return Response(lookup(data.training_png, case, z), media_type="image/png")

    @app.post("/api/cases/{case}/decision")
    def decide(case: str, body: dict = Body(...)):  # noqa: B008 - FastAPI's way of declaring a JSON body
        lookup(data.case, case)
        try:
            return data.decide(case, body.get("decision"), body.get("reason"), str(body.get("comment") or ""))
        except InputError as e:
            raise HTTPException(status_code=422, detail="; ".join(e.problems)) from None

    return app


def serve(data: ReviewData, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True) -> None:
    """Serve the page until interrupted; open it in the user's browser."""
    import threading
    import webbrowser

    import uvicorn

    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("review: serving on %s: anyone who can reach this machine on port %d can read the cases "
                    "and record decisions as %s", host, port, data.reviewer)
    log.info("review: %d cases, reviewer %s, decisions -> %s; open %s (Ctrl-C stops)", len(data.hashes),
             data.reviewer, data.reviews_dir / f"{data.reviewer}.jsonl", url)
    if open_browser:
        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    uvicorn.run(create_app(data), host=host, port=port, log_level="warning")
