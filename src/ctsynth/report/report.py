"""report: one self-contained HTML page (``reports/report.html``) plus its figures as PNG files.

Everything is embedded (PNG as base64 ``data:`` URIs, inline CSS, no JavaScript, no external
links), so the file can be mailed or opened offline. Every input except the params is optional:
a missing file turns its section into a short "not available" note instead of an error.

    files = run(params, reports_dir, generated_dir, processed_dir, train_reports_dir, out_html,
                figures_dir, split_path, manifest_path, synthetic_dir)   # -> files to log to MLflow
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ctsynth.core.accel import runtime_summary
from ctsynth.core.config import flatten, to_dict
from ctsynth.core.errors import InputError
from ctsynth.core.io import atomic_dir, canonical, write_text
from ctsynth.data import modality
from ctsynth.data.masks import index_volume
from ctsynth.data.store import evenly_spaced
from ctsynth.evaluate.registry import GROUPS, SUFFIX, definition, lookup
from ctsynth.evaluate.results import Results, fmt
from ctsynth.report.figures import (
    fig_condition_subsets,
    fig_d_accuracy,
    fig_losses,
    fig_privacy,
    fig_utility,
    save_orthogonal_views,
    save_synthetic_case,
)
from ctsynth.report.summary import esc, first_grid, privacy_verdict, section_summary

log = logging.getLogger("ctsynth.report.report")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1em auto;max-width:1320px;
color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#777;font-style:italic}.muted{color:#777}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:0 1.5em}
h4{margin:.8em 0 .2em}nav a{margin-right:1em}.scroll{overflow-x:auto;max-width:100%}
h1{margin:.2em 0 .3em}#summary{margin-top:.6em}
.summary{display:grid;grid-template-columns:minmax(0,1fr) 430px;gap:1.5em;align-items:start}
.summary figure{margin:0}.summary figure img{width:430px}
.reading{font-size:1.02em;margin:.3em 0 .5em}.privacy{margin:.3em 0 .6em}
table.headline td,table.headline th{padding:2px 8px}td.ci{white-space:nowrap}
.study{background:#f4f8fb;border-left:4px solid #0072b2;padding:.4em .8em;margin:.4em 0 .8em}
"""


# ------------------------------------------------------------------------------ small helpers

def table(frame: pd.DataFrame, max_rows: int = 200) -> str:
    """DataFrame -> HTML table (escaped, numbers right-aligned)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.head(max_rows).itertuples(index=False):
        cells = []
        for v in row:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            cells.append(f"<td class='num'>{esc(fmt(v))}</td>" if num else f"<td>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='note'>{len(frame) - max_rows} more rows not shown</p>" if len(frame) > max_rows else ""
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(body)}</table></div>{more}"


def img_tag(path: Path, caption: str = "", width: int | None = None) -> str:
    """A PNG embedded as a base64 data URI inside a captioned figure."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f" style='width:{width}px'" if width else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure><img{style} alt='{esc(caption)}' src='data:image/png;base64,{data}'>{cap}</figure>"


def missing(what: str, path) -> str:
    return f"<p class='note'>{esc(what)} not available — {esc(path)} not found.</p>"


def _read_json(path: Path):
    """Parsed JSON, None when the file is absent; InputError naming the file when corrupt."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _read_csv(path: Path):
    """DataFrame, None when the file is absent; InputError naming the file when unreadable."""
    if not path.exists():
        return None
    try:
        return pd.read_csv(path, dtype={"case": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV table ({e})") from None


# ------------------------------------------------------------------------------ sections

def section_config(params) -> str:
    """Every param that shapes the results, one small table per params.yaml section (not
    ``tracking``: where a run is logged changes no result, and the report does not depend on it)."""
    groups: dict[str, list] = {}
    for key, value in flatten(to_dict(params)).items():
        section, _, rest = key.partition(".")
        if section == "tracking":
            continue
        shown = json.dumps(value) if isinstance(value, (list, dict)) else value
        groups.setdefault(section if rest else "(top level)", []).append({"param": rest or key,
                                                                          "value": shown})
    cells = "".join(f"<div><h4>{esc(name)}</h4>{table(pd.DataFrame(rows))}</div>"
                    for name, rows in groups.items())
    return ("<p class='muted'>params.yaml as validated for this report.</p><div class='grid'>"
            + cells + "</div>")


def section_data(processed_dir: Path, split_path: Path, manifest_path: Path) -> str:
    meta, split = _read_json(processed_dir / "meta.json"), _read_json(split_path)
    manifest = _read_csv(manifest_path)
    out = []
    if meta is None:
        out.append(missing("Processed data summary", processed_dir / "meta.json"))
    else:
        summary = {"image size": f"{meta['image_size']}²", "HU window": meta.get("hu_window"),
                   "structures (condition)": ", ".join(meta.get("structures", [])),
                   "slice selection": f"{meta.get('slices', '?')} (margin {meta.get('margin', '?')})",
                   "label map": ", ".join(f"{k}→{v}" for k, v in meta.get("label_map", {}).items()),
                   "cases preprocessed": len(meta.get("cases", {}))}
        if split:
            for part in ("train", "val", "test"):
                n_slices = split.get("slices", {}).get(part, "?")
                summary[f"{part}"] = f"{len(split.get(part, []))} cases, {n_slices} slices"
        out.append(table(pd.DataFrame({"": list(summary), "value": [str(v) for v in summary.values()]})))
    if split is None:
        out.append(missing("Split", split_path))
    if manifest is not None:
        if split:
            where = {c: part for part in ("train", "val", "test") for c in split.get(part, [])}
            manifest.insert(1, "split", manifest.case.map(where).fillna("—"))
        out.append("<h3>Cases</h3>" + table(_compact_manifest(manifest)))
    else:
        out.append(missing("Case manifest", manifest_path))
    return "".join(out)


def _compact_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """One short row per case: split, original orientation, grid, spacing, HU range, voxels."""
    m = manifest
    out = pd.DataFrame({"case": m.case})
    if "split" in m:
        out["split"] = m.split
    if "orig_axcodes" in m:
        out["orientation"] = m.orig_axcodes
    for prefix, label, unit in (("shape", "canonical grid", ""), ("spacing", "spacing", " mm")):
        cols = [f"{prefix}_{a}" for a in "xyz"]
        if all(c in m for c in cols):
            out[label] = [" × ".join(f"{v:g}" for v in row) + unit for row in m[cols].to_numpy(float)]
    if {"hu_min", "hu_max"} <= set(m.columns):
        out["HU range"] = [f"{a:g} … {b:g}" for a, b in zip(m.hu_min, m.hu_max)]
    vox = [c for c in m.columns if c.startswith("vox_")]
    if vox:
        out["structures present"] = [", ".join(c[4:] for c in vox if row[c] > 0) for _, row in m.iterrows()]
    return out


def metric_rows(res: Results, keys, saved: dict | None = None) -> str:
    """Table rows (key, value or the reason it is null, interval, definition) of ``keys``."""
    rows = []
    for key in keys:
        r = res[key]
        shown = fmt(r.value) if r.value is not None else "not computed — " + (r.null_reason or "no reason recorded")
        rows.append(f"<tr><td><code>{esc(key)}</code></td><td class='{'num' if r.value is not None else 'note'}'>"
                    f"{esc(shown)}</td><td class='num ci'>{esc(r.interval or '')}</td>"
                    f"<td>{esc(definition(key) or (saved or {}).get(key, ''))}</td></tr>")
    return ("<table><tr><th>metric</th><th>value</th><th>95 % interval</th><th>definition</th></tr>"
            + "".join(rows) + "</table>")


def section_metrics(reports_dir: Path, res: Results | None) -> str:
    """Every metric of metrics.json, grouped as the registry groups them (headline first), and the
    free-text notes of metrics_notes.json (definitions it saved serve keys the registry lacks)."""
    if res is None:
        return missing("Metrics", reports_dir / "metrics.json")
    notes = _read_json(reports_dir / "metrics_notes.json") or {}
    saved = dict(notes.get("definitions") or {})
    groups: dict[str, list[str]] = {g: [] for g in [*GROUPS, "other"]}
    for key in res.metrics():
        spec = lookup(key)
        groups[spec.group if spec else "other"].append(key)
    parts = [f"<h3>headline</h3>{metric_rows(res, res.headline(), saved)}"]
    parts += [f"<h3>{esc(g)}</h3><p class='muted'>{esc(GROUPS.get(g, 'not in the registry'))}</p>"
              f"{metric_rows(res, ks, saved)}" for g, ks in groups.items() if ks]
    other = {k: v for k, v in notes.items() if k not in ("null_metrics", "definitions", "feature_dims")
             and isinstance(v, str) and k not in res}
    foot = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in other.items())
    return "".join(parts) + (f"<ul class='muted'>{foot}</ul>" if foot else "") + runtime_lines(notes.get("runtime"))


# the steps of metrics_notes.json ``runtime`` (ctsynth.evaluate.evaluate.runtime_note), as the report and
# docs/results.md (ctsynth.tools.reference) name them
RUNTIME_STEPS = (("generator_trained_on", "generator trained on"), ("generated_on", "test slices generated on"),
                 ("segmenter_trained_on", "segmenter trained on"), ("evaluated_on", "evaluated on"))


def runtime_lines(runtime: dict | None) -> str:
    """Where the numbers were computed (metrics_notes.json ``runtime``): one line per step."""
    if not isinstance(runtime, dict):
        return ""
    rows = "".join(f"<li>{esc(label)}: {esc(runtime_summary(runtime.get(key)))}</li>" for key, label in RUNTIME_STEPS)
    return (f"<h3>computed on</h3><p class='muted'>{esc(runtime.get('about', ''))}</p>"
            f"<ul class='muted'>{rows}</ul>")


def merge_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Show ``<col>_ci95_lo/hi`` columns inside ``<col>``'s cells as 'value [lo, hi]'."""
    frame = frame.copy()
    for col in list(frame.columns):
        lo, hi = f"{col}{SUFFIX}_lo", f"{col}{SUFFIX}_hi"
        if lo in frame and hi in frame:
            frame[col] = [fmt(v) if pd.isna(a) else f"{fmt(v)} [{fmt(a)}, {fmt(b)}]"
                          for v, a, b in zip(frame[col], frame[lo], frame[hi])]
            frame = frame.drop(columns=[lo, hi])
    return frame


def section_per_case(reports_dir: Path) -> str:
    frame = _read_csv(reports_dir / "per_case.csv")
    if frame is None:
        return missing("Per-case metrics", reports_dir / "per_case.csv")
    return ("<p class='muted'>One row per test patient; brackets: 95 % interval from resampling that "
            "patient's slices.</p>" + table(merge_intervals(frame)))


def section_per_structure(reports_dir: Path, res: Results) -> str:
    frame = _read_csv(reports_dir / "per_structure.csv")
    if frame is None:
        return missing("Per-structure metrics", reports_dir / "per_structure.csv")
    for col, key in (("mae_hu", "mae_hu_{}"), ("dice_generated", "dice_generated_{}"), ("dice_real", "dice_real_{}")):
        if col in frame and "structure" in frame:
            ivs = [res[key.format(s)].interval if key.format(s) in res else None for s in frame["structure"]]
            frame[f"{col}{SUFFIX}_lo"] = [iv.lo if iv else np.nan for iv in ivs]
            frame[f"{col}{SUFFIX}_hi"] = [iv.hi if iv else np.nan for iv in ivs]
    return ("<p class='muted'>Brackets: 95 % patient-level interval (how it is made: the intervals note "
            "under Metrics).</p>"
            + table(merge_intervals(frame)))


def section_samples(generated_dir: Path, figures: Path, structures: list[str], n_cases: int = 4,
                    shown_above: Path | None = None) -> str:
    """Sample grids of up to ``n_cases`` test cases spread over the list; ``shown_above``: the grid
    already on the first screen, copied as a figure but not embedded twice."""
    grids = sorted((generated_dir / "grids").glob("*.png"))
    if not grids:
        return missing("Sample grids", generated_dir / "grids")
    picks = [grids[i] for i in evenly_spaced(len(grids), n_cases)]
    embedded = [g for g in picks if g != shown_above]
    above = (f" Case {shown_above.stem}'s grid is in the summary at the top."
             if shown_above is not None and shown_above in picks else "")
    parts = [f"<p>Condition subset used: <b>{esc(', '.join(structures) or '?')}</b>. Columns: the "
             f"structure mask fed to the generator, the real slice, the generated slice and their "
             f"absolute difference in HU. {len(grids)} test cases; {len(picks)} shown.{esc(above)}</p>"]
    for grid in picks:
        shutil.copyfile(grid, figures / f"sample_{grid.name}")
        if grid in embedded:
            parts.append(img_tag(grid, f"test case {grid.stem}", width=500))
    return "".join(parts)


_ORTHO_KEYS = ("zcons_ssim_ratio", "zgrad_ratio", "fd_tri_rand_axial", "fd_tri_rand_coronal",
               "fd_tri_rand_sagittal", "fd_tri_rand_mean")


def section_orthogonal(res: Results, generated_dir: Path, processed_dir: Path, figures: Path,
                       window, unit: str = "HU") -> str:
    """Coronal and sagittal views through the heart of every test case (real | generated |
    |difference|) and the through-plane numbers beside them."""
    from ctsynth.evaluate.throughplane import heart_centre, load_test_volumes

    if not (generated_dir / "fake.npy").exists() or not (processed_dir / "meta.json").exists():
        return missing("Orthogonal views", generated_dir / "fake.npy")
    parts = [f"<p>Each test case's generated slices stacked back into a volume on the processed grid "
             f"(the real one beside it), cut through the centre of its structures. A generator that "
             f"works slice by slice shows as horizontal streaks here.</p>"
             f"{metric_rows(res, [k for k in _ORTHO_KEYS if k in res])}"]
    for vol in load_test_volumes(processed_dir, generated_dir):
        out = figures / f"orthogonal_{vol.case}.png"
        save_orthogonal_views(out, vol.case, vol.real, vol.fake, heart_centre(vol.masks), vol.dz, dxy=vol.dxy,
                              window=window, unit=unit)
        parts.append(img_tag(out, f"test case {vol.case}: coronal (top) and sagittal (bottom)", width=560))
    return "".join(parts)


def read_condition_subsets(path: Path):
    """``(subsets, panels, titles)`` from the generate stage's ``condition_subsets.npz``."""
    with np.load(path) as f:
        names = json.loads(str(f["names"]))
        panels = [(name, f["masks"][i], f["images"][i]) for i, name in enumerate(names)]
        return json.loads(str(f["subsets"])), panels, [tuple(x) for x in json.loads(str(f["titles"]))]


def section_subsets(generated_dir: Path, figures: Path, structures: list[str]) -> str:
    """Which condition subset the model uses, and test slices generated from each single one."""
    intro = (f"<p>Condition subset used for training and for every generated test slice: "
             f"<b>{esc(', '.join(structures))}</b>.</p>")
    source = generated_dir / "condition_subsets.npz"
    if not source.is_file():
        return intro + missing("Per-subset generation", source)
    out = figures / "condition_subsets.png"
    subsets, panels, titles = read_condition_subsets(source)
    fig_condition_subsets(panels, titles, out)
    return (intro + f"<p>The same test slices generated from the full set and from each single "
            f"structure alone ({len(subsets) - 1} present on these slices), the other condition "
            f"channels left empty — what <code>ctsynth generate --structures</code> does.</p>"
            + img_tag(out, "rows: condition subset (top: the real slice); columns: mask | image"))


def section_training(train_dir: Path, figures: Path, iterations: int) -> str:
    """Figs. 2-3 from losses.csv and the evolution snapshots (Fig. 5)."""
    losses = _read_csv(train_dir / "losses.csv")
    if losses is not None and not losses.empty and "step" in losses:
        iterations = int(losses.step.max())   # the run's own length (params may have been overridden)
    parts = []
    if losses is None or losses.empty:
        parts.append(missing("Training curves", train_dir / "losses.csv"))
    else:
        parts.append(img_tag(fig_losses(losses, figures / "losses.png"), "Fig. 2 — losses"))
        parts.append(img_tag(fig_d_accuracy(losses, figures / "d_accuracy.png"), "Fig. 3 — D accuracy"))
    snaps = sorted((train_dir / "snapshots").glob("*.png"))
    parts.append("<h3>Evolution during training (Fig. 5)</h3>")
    if not snaps:
        parts.append(missing("Evolution snapshots", train_dir / "snapshots"))
    for snap in snaps:
        digits = "".join(ch for ch in snap.stem if ch.isdigit())
        step = int(digits) if digits else None
        cap = (snap.stem if step is None
               else f"step {step} ({100 * step / max(iterations, 1):.0f} % of training)")
        shutil.copyfile(snap, figures / f"evolution_{snap.name}")
        parts.append(img_tag(snap, cap))
    return "".join(parts)


def section_privacy(reports_dir: Path, figures: Path, threshold: float, rule: str = "") -> str:
    """Histogram of nearest-training SSIM for generated slices vs the real-test baseline, then the
    privacy stage's screening of the synthetic dataset."""
    privacy = _read_csv(reports_dir / "privacy.csv")
    if privacy is None or privacy.empty or "similarity" not in privacy:
        return missing("Privacy check", reports_dir / "privacy.csv")
    gen = privacy.similarity.to_numpy(float)
    real = privacy.real_similarity.to_numpy(float) if "real_similarity" in privacy else None
    out = img_tag(fig_privacy(gen, real, threshold, figures / "privacy_hist.png"),
                  "nearest-training-slice similarity; red line: the threshold")
    text = (f"<p>Each generated slice is compared with its nearest <i>training</i> slice; a generator "
            f"that memorised its training data would pile up near 1. Threshold: {esc(rule or f'{threshold:g}')}. "
            f"{len(gen)} generated test slices, {(gen > threshold).mean():.1%} above {threshold:.3f}")
    if real is not None:
        text += f" (real test slices, the baseline: {(real > threshold).mean():.1%})"
        verdict = privacy_verdict(float(np.mean(gen)), float(np.mean(real)))
        text += (f". Mean similarity {np.mean(gen):.3f} generated vs {np.mean(real):.3f} real: "
                 f"generated slices are {verdict}")
    if "shareable" in privacy:
        text += f"; {int(privacy.shareable.astype(bool).sum())} generated slices are shareable"
    worst = privacy.sort_values("similarity", ascending=False).head(8)
    return (text + ".</p>" + out + "<h3>Generated slices most similar to training</h3>" + table(worst)
            + _synthetic_screening(reports_dir))


def _synthetic_screening(reports_dir: Path) -> str:
    """The privacy stage's verdict on every case of the synthetic dataset (privacy_cases.csv)."""
    cases, summary = _read_csv(reports_dir / "privacy_cases.csv"), _read_json(reports_dir / "privacy_synthetic.json")
    if cases is None or summary is None:
        return "<h3>Synthetic dataset</h3>" + missing("Synthetic dataset screening", reports_dir / "privacy_cases.csv")
    n_pass = int((cases.verdict == "pass").sum())
    text = (f"<h3>Synthetic dataset ({len(cases)} cases made from warped training masks)</h3><p>Every labelled "
            f"slice of <code>data/synthetic</code> against every training slice, and each case's mask against the "
            f"training mask it was warped from (whole-heart Dice, cap {summary.get('max_mask_dice')}): "
            f"<b>{n_pass} of {len(cases)} cases pass</b>; "
            f"{fmt(100 * (summary.get('privacy_synthetic_share_above') or 0))} % of "
            f"{summary.get('privacy_synthetic_n_slices')} slices above the threshold, nearest-training similarity "
            f"mean {fmt(summary.get('privacy_synthetic_similarity_mean'))}, max "
            f"{fmt(summary.get('privacy_synthetic_similarity_max'))} (unseen validation patients' slices: max "
            f"{fmt(summary.get('privacy_reference_similarity_max'))}). Per case: "
            f"<code>reports/privacy_cases.csv</code>; per slice: <code>reports/privacy_synthetic.csv</code>."
            + (f" Case rule: {esc(summary['case_rule'])}." if summary.get("case_rule") else "") + "</p>")
    share = _read_json(reports_dir / "share.json")
    if share:
        c = share["counts"]
        text += (f"<p><b>Shared</b> (<code>data/share</code>, with its dataset card): {c['shared']} of {c['made']} "
                 f"cases ({c['passed_privacy']} passed privacy; expert review "
                 f"{'required' if share.get('require_review') else 'not required'}: {c['accepted']} accepted, "
                 f"{c['rejected']} rejected by a reviewer, {c['stale_decisions']} stale decision(s)).</p>")
    return text + table(cases.sort_values("similarity_max", ascending=False))


def _threshold(res: Results, params) -> float:
    """The evaluate stage's privacy threshold (calibrated), else the params' cap (older reports)."""
    value = res.value("privacy_threshold")
    return float(value) if value is not None else float(params.privacy.max_similarity or 1.0)


def _resolution_note(row) -> str:
    """The effective in-plane resolution of a synthetic case (manifest columns of ``synthesize``)."""
    if "effective_spacing_x_mm" not in row or pd.isna(row.effective_spacing_x_mm):
        return ""
    finer = row.effective_spacing_x_mm > row.spacing_x_mm * 1.01 or row.effective_spacing_y_mm > row.spacing_y_mm * 1.01
    return (f"<p>Resolution: the generator draws each axial slice at {int(row.model_size)}² "
            f"({'resized' if finer else 'matched'} to the label grid), so the CT's in-plane detail is "
            f"{fmt(row.effective_spacing_x_mm)} × {fmt(row.effective_spacing_y_mm)} mm"
            + (f" on a grid of {fmt(row.spacing_x_mm)} × {fmt(row.spacing_y_mm)} mm: it looks soft by "
               f"construction (raise <code>preprocess.image_size</code> to draw finer)" if finer else "")
            + " (manifest columns <code>effective_spacing_*_mm</code>).</p>")


def section_synthetic(synthetic_dir: Path | None, figures: Path, label_map: dict, window, unit: str = "HU") -> str:
    """One synthetic case of ``data/synthetic`` (mask | CT in three orthogonal views) and its draw."""
    import nibabel as nib

    from ctsynth.core.labels import STRUCTURES

    if synthetic_dir is None:
        return missing("Synthetic cases", "the synthetic folder (--synthetic)")
    manifest = _read_csv(synthetic_dir / "manifest.csv")
    if manifest is None or manifest.empty:
        return missing("Synthetic cases", synthetic_dir / "manifest.csv")
    row = manifest.iloc[0]
    image = canonical(nib.load(str(synthetic_dir / row.image_file)))
    label_path = synthetic_dir / row.label_file
    raw = np.asarray(canonical(nib.load(str(label_path))).dataobj)
    labels, _ = index_volume(label_path, raw, label_map, list(STRUCTURES))          # structure indices
    heart = np.argwhere(labels > 0)
    centre = heart.mean(0).round().astype(int) if len(heart) else np.array(labels.shape) // 2
    out = save_synthetic_case(figures / f"synthetic_{row.case}.png", row.case, np.asarray(image.dataobj),
                              labels, centre, image.header.get_zooms()[:3], window=window, unit=unit)
    draw = ", ".join(f"{k} {fmt(row[k])}" for k in manifest.columns
                     if k.startswith(("rot_", "scale_", "shift_", "deform_")))
    text = (f"<p><b>{len(manifest)}</b> new labelled cases in <code>{esc(synthetic_dir)}</code> (image/label "
            f"NIfTI pairs that <code>ingest</code> reads; <code>ctsynth synthesize --layout nnunet</code> writes "
            f"the nnU-Net layout). Each is a <i>training</i> mask warped by a random 3-D affine and smooth "
            f"deformation, its CT drawn slice by slice by the generator. Shown: <b>{esc(row.case)}</b>, warped "
            f"from {esc(row.source)} (draw seed {esc(row.draw_seed)}, attempt {esc(row.attempt)}): "
            f"{esc(draw)}.</p>" + _resolution_note(row))
    return text + img_tag(out, f"synthetic case {row.case}: axial, coronal, sagittal through the heart", width=480)


_UTILITY_KINDS = (("real", "real training slices only (the segmenter stage's model)"),
                  ("synthetic", "synthetic cases only"), ("mixed", "real + synthetic"))


def section_utility(reports_dir: Path, res: Results, figures: Path) -> str:
    """Does synthetic data help segmentation: Dice on real test slices of the three segmenters."""
    frame = _read_csv(reports_dir / "utility.csv")
    if frame is None or frame.empty or "utility_dice_real" not in res:
        return missing("Downstream utility", reports_dir / "utility.csv")
    rows = "".join(f"<tr><td>{esc(what)}</td><td class='num ci'>{esc(res.shown(f'utility_dice_{k}'))}</td></tr>"
                   for k, what in _UTILITY_KINDS)
    contrasts = "".join(
        f"<tr><td>{esc(label)} <code class='muted'>{key}</code></td><td class='num ci'>{esc(res.shown(key))}</td></tr>"
        for label, key in (("synthetic only ÷ real only (target ≥ 0.8)", "utility_ratio_synthetic"),
                           ("real + synthetic − real only (target ≥ −0.01)", "utility_gain_mixed")))
    text = (f"<p>The segmenter of the evaluate stage (same architecture, budget and seed) trained on three "
            f"training sets and scored on the <i>real</i> test slices: {fmt(res.value('utility_n_synthetic_cases'))} "
            f"synthetic cases ({fmt(res.value('utility_n_synthetic_slices'))} slices) against "
            f"{fmt(res.value('utility_n_real_train_slices'))} real training slices. Mean Dice over structures; "
            f"the three share one patient-level resampling (the same replicates), so the contrasts below have "
            f"intervals of their own.</p>"
            f"<table><tr><th>segmenter trained on</th><th>mean Dice [95 % interval]</th></tr>{rows}{contrasts}</table>")
    note = ((_read_json(reports_dir / "utility.json") or {}).get("notes") or {}).get("utility")
    text += f"<p class='muted'>{esc(note)}</p>" if note else ""          # how many trainings, where the spread is
    return text + img_tag(fig_utility(frame, figures / "utility.png"), "Dice per structure on real test slices")


def for_modality(page: str, meta: dict) -> str:
    """An MR run's report (``data.modality: mr``): it says MR and names its unit; no Hounsfield unit is
    shown (every "HU" becomes "nu", CT becomes MR in the prose; metric keys such as ``mae_hu`` keep their
    names), and a note says what nu are."""
    if modality.unit(meta) != "nu":
        return page
    page = re.sub(r"\bHU\b", "nu", page)
    page = re.sub(r"\bCT\b", "MR", page)
    note = ("<p class='study'><b>MR.</b> Intensities are normalised units (nu): each volume's 0.5 and 99.5 % "
            "intensity percentiles at −1000 and +1000 nu. MR has no Hounsfield units: metrics named <code>_hu</code> "
            "are in nu, the body outline is above −700 nu, texture is measured inside the heart structures only, "
            "and derived anatomy has no bone class (docs/anatomy.md, ctsynth.data.modality).</p>")
    return page.replace("</h1>", "</h1>" + note, 1)


def study_staleness(study_lock: Path | None, generator_path: Path | None) -> str | None:
    """Why the study no longer describes this run, or None: its cells (``study_lock``, the study's
    ``dvc.lock``) used a generator whose md5 differs from this run's ``models/generator.pt``. None
    too when either is not given or cannot be read (nothing to compare)."""
    if study_lock is None or generator_path is None or not Path(generator_path).is_file():
        return None
    try:
        lock = yaml.safe_load(Path(study_lock).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    used = {str(d.get("md5")) for stage in (lock.get("stages") or {}).values() for d in stage.get("deps") or []
            if str(d.get("path", "")).endswith("models/generator.pt") and d.get("md5")}
    if not used:
        return None
    now = hashlib.md5(Path(generator_path).read_bytes()).hexdigest()
    if used == {now}:
        return None
    return (f"Stale: the study's cells used another generator (md5 {', '.join(sorted(u[:8] for u in used))}) than "
            f"this run's ({now[:8]}); its numbers describe that generator. Rerun it: ./run repro "
            f"studies/utility/dvc.yaml.")


def study_lead(study: dict | None, stale: str | None = None) -> str:
    """The sentence the report leads with: the utility study's answer (``studies/utility/published.json``,
    written by the rule of :func:`ctsynth.tools.utility_study.lead_sentence`, its caveat included) and,
    when it is, the warning that it is stale."""
    sentence = (study or {}).get("sentence")
    if not sentence:
        return ("<p class='study muted'>Utility study: not run in this checkout (<code>./run repro "
                "studies/utility/dvc.yaml</code>, docs/experiments/utility-study.md).</p>")
    warn = f" <b class='warn'>{esc(stale)}</b>" if stale else ""
    return (f"<p class='study'><b>Does synthetic data save real patients?</b> {esc(sentence)}{warn} "
            f"<span class='muted'>(utility study, {esc(study.get('measured_on', ''))}; "
            f"<a href='#utility'>curve below</a>, {esc(study.get('details', ''))})</span></p>")


def section_study(study: dict | None) -> str:
    """The utility study's curve (Dice per arm and number of real patients) and its contrasts."""
    if not study or not study.get("curve"):
        return ""
    curve = pd.DataFrame(study["curve"])
    curve["Dice [95 %]"] = [f"{r.dice:.3f} [{r.lo:.3f}, {r.hi:.3f}]" for r in curve.itertuples()]
    wide = curve.pivot(index="n", columns="arm", values="Dice [95 %]").fillna("").reset_index()
    wide = wide.rename(columns={"n": "real patients"})
    contrasts = pd.DataFrame(study.get("contrasts") or [])
    if not contrasts.empty:
        contrasts["difference [95 %]"] = [f"{r.gain:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]" for r in contrasts.itertuples()]
        contrasts = contrasts[["n", "arm", "minus", "difference [95 %]"]].rename(columns={"n": "real patients"})
    return (f"<h3>The utility study: over the number of real patients</h3><p>{esc(study['sentence'])}</p>"
            f"<p class='muted'>Run on demand (<code>./run repro studies/utility/dvc.yaml</code>); "
            f"{esc(study.get('measured_on', ''))}; mean Dice over structures, 95 % two-way bootstrap over "
            f"replicates (patient draws × seeds) and test patients; {esc(study.get('details', ''))}.</p>"
            f"{table(wide)}" + (f"<p>Paired differences (same replicates and patients):</p>{table(contrasts)}"
                                if not contrasts.empty else ""))


def _summary(res: Results | None, generated_dir: Path, study: dict | None = None, margins=None,
             stale: str | None = None) -> str:
    """The first screen (:mod:`ctsynth.report.summary`): the utility study's sentence, then evaluate's
    reading and headline, and the first sample grid."""
    grid = first_grid(generated_dir)
    grid_html = (img_tag(grid, f"test case {grid.stem}: mask | real | generated | |difference| (HU)")
                 if grid else missing("Sample grid", generated_dir / "grids"))
    return study_lead(study, stale) + section_summary(res, grid_html, margins)


# ------------------------------------------------------------------------------ the report

def run(params, reports_dir, generated_dir, processed_dir, train_reports_dir, out_html,
        *, figures_dir, split_path, manifest_path, synthetic_dir=None, study_path=None,
        generator_path=None, study_lock=None) -> list[Path]:
    """Write ``out_html`` and ``figures_dir``; return the files written (for MLflow logging)."""
    reports_dir, generated_dir, processed_dir = Path(reports_dir), Path(generated_dir), Path(processed_dir)
    train_dir, out_html, figures_dir = Path(train_reports_dir), Path(out_html), Path(figures_dir)
    meta = _read_json(processed_dir / "meta.json") or {}
    structures = list(meta.get("structures", params.preprocess.structures))
    res = Results.read(reports_dir)                    # None without metrics.json
    known = res or Results()
    study = _read_json(Path(study_path)) if study_path else None
    unit = modality.unit(meta)
    with atomic_dir(figures_dir) as figs:
        sections = [
            ("summary", "Summary", _summary(res, generated_dir, study, params.verdict,
                                            study_staleness(study_lock, generator_path))),
            ("metrics", "Metrics (test set)", section_metrics(reports_dir, res)),
            ("structures", "Per structure", section_per_structure(reports_dir, known)),
            ("cases", "Per case", section_per_case(reports_dir)),
            ("samples", "Sample test cases", section_samples(generated_dir, figs, structures,
                                                             shown_above=first_grid(generated_dir))),
            ("orthogonal", "Orthogonal views (through-plane)",
             section_orthogonal(known, generated_dir, processed_dir, figs, meta.get("hu_window", [-1000, 1000]), unit)),
            ("subsets", "Condition subsets", section_subsets(generated_dir, figs, structures)),
            ("synthetic", "Synthetic labelled cases",
             section_synthetic(synthetic_dir and Path(synthetic_dir), figs, params.data.label_map,
                               meta.get("hu_window", [-1000, 1000]), unit)),
            ("utility", "Does synthetic data help segmentation?",
             section_utility(reports_dir, known, figs) + section_study(study)),
            ("training", "Training (Figs. 2–3)",
             section_training(train_dir, figs, params.train.iterations)),
            ("privacy", "Privacy / memorization",
             section_privacy(reports_dir, figs, _threshold(known, params),
                             (_read_json(reports_dir / "metrics_notes.json") or {}).get("privacy_threshold", ""))),
            ("data", "Data", section_data(processed_dir, Path(split_path), Path(manifest_path))),
            ("config", "Run configuration", section_config(params)),
        ]
        nav = "".join(f"<a href='#{key}'>{esc(title)}</a>" for key, title, _ in sections)
        body = "".join(f"<h2 id='{key}'>{esc(title)}</h2>{content}" for key, title, content in sections)
        page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ctsynth report</title>"
                f"<style>{CSS}</style></head><body><h1>ctsynth — mask-conditioned CT synthesis report</h1>"
                f"<nav>{nav}</nav>{body}</body></html>")
        page = for_modality(page, meta)
        written = sorted(p.name for p in figs.glob("*.png"))
    write_text(out_html, page)
    log.info("report: %s (%.0f kB) and %d figures in %s", out_html, out_html.stat().st_size / 1024,
             len(written), figures_dir)
    return [out_html] + [figures_dir / name for name in written]
