"""The report's first screen: the answer before the details.

One paragraph in plain words (how close generated slices are to real ones, relative to the
noise floor; the weakest structure; the privacy verdict), the headline metrics with their
95 % intervals and noise floors, and one sample grid. Everything is read from what evaluate
wrote (``metrics.json``, ``metrics_ci.json``, ``metrics_notes.json``) and generate's grids;
nothing is recomputed, and a missing file leaves a short note instead.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from ctsynth.core.labels import STRUCTURES

# (label, metric key, better, floor key, floor meaning) — rows of the headline table
HEADLINE = (
    ("SSIM", "ssim", "higher", None, ""),
    ("PSNR (dB)", "psnr", "higher", None, ""),
    ("MAE (HU)", "mae_hu", "lower", None, ""),
    ("MSE ([-1, 1] space)", "mse", "lower", None, ""),
    ("Dice of generated slices (mean)", "dice_generated_mean", "higher", "dice_real_mean",
     "segmenter on the real slices (ceiling)"),
    ("FD, segmenter features", "fd_seg", "lower", "fd_seg_floor", "real validation vs real test"),
    ("FD to unseen patients", "fd_seg_vs_val", "lower", "fd_seg_floor", "same comparison, real test slices"),
    ("KID, segmenter features", "kid_seg", "lower", "kid_seg_floor", "real validation vs real test"),
    ("FID (Inception)", "fid_inception", "lower", "fid_inception_floor", "real validation vs real test"),
    ("KID (Inception)", "kid_inception", "lower", "kid_inception_floor", "real validation vs real test"),
)


def _esc(value) -> str:
    return html.escape(str(value))


def _num(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def with_interval(metrics: dict, ci: dict, key: str) -> str:
    """'0.812 [0.79, 0.83]' for a metric key with an interval, '0.812' without, '—' when null."""
    value = metrics.get(key)
    iv = ci.get(f"{key}_ci95")
    if value is None or not iv or iv.get("lo") is None:
        return _num(value)
    return f"{_num(value)} [{_num(iv['lo'])}, {_num(iv['hi'])}]"


def _overlap(ci: dict, a: str, b: str) -> bool | None:
    ia, ib = ci.get(f"{a}_ci95"), ci.get(f"{b}_ci95")
    if not ia or not ib:
        return None
    return ia["lo"] <= ib["hi"] and ib["lo"] <= ia["hi"]


def floor_reading(metrics: dict, ci: dict) -> str:
    """Generated vs real in the segmenter's features, stated relative to the noise floor."""
    fd, floor, vs_val = metrics.get("fd_seg"), metrics.get("fd_seg_floor"), metrics.get("fd_seg_vs_val")
    if fd is None:
        return "The feature-space distance (fd_seg) was not computed."
    if floor is None or vs_val is None or floor <= 0:
        return (f"In the segmenter's features generated slices lie at FD {with_interval(metrics, ci, 'fd_seg')} "
                f"from their real counterparts; no noise floor was computed (it needs validation patients).")
    ratio = vs_val / floor
    if ratio <= 1:
        verdict = "at or below the noise floor: as far from unseen patients as real slices are"
    elif _overlap(ci, "fd_seg_vs_val", "fd_seg_floor"):
        verdict = (f"{ratio:.1f}× the noise floor, but the intervals overlap: with "
                   f"{metrics.get('n_test_cases', '?')} test and {metrics.get('n_val_cases', '?')} validation "
                   f"patients the difference from real slices is not resolved")
    else:
        verdict = f"{ratio:.1f}× the noise floor: distinguishable from real slices"
    return (f"Measured against unseen real patients (the validation set) in the segmenter's features, "
            f"generated test slices lie at FD {with_interval(metrics, ci, 'fd_seg_vs_val')}, real test "
            f"slices at {with_interval(metrics, ci, 'fd_seg_floor')} (the noise floor) — {verdict}. "
            f"Paired with their own real slices, FD is {with_interval(metrics, ci, 'fd_seg')} "
            f"({fd / floor:.2f}× the floor).")


def weakest_structure(metrics: dict) -> str | None:
    """The structure generated worst relative to the real ceiling (lowest Dice ratio), as a phrase."""
    scored = []
    for s in STRUCTURES:
        gen, real = metrics.get(f"dice_generated_{s}"), metrics.get(f"dice_real_{s}")
        if gen is not None and real:
            scored.append((gen / real, s, gen, real))
    if not scored:
        return None
    _, s, gen, real = min(scored)
    mae = metrics.get(f"mae_hu_{s}")
    return (f"The weakest structure is <b>{_esc(s)}</b>: the segmenter finds it in generated slices with "
            f"Dice {gen:.2f} against {real:.2f} in the real ones" + (f", MAE {mae:.0f} HU inside it" if mae else "")
            + ".")


def privacy_verdict(gen_mean: float, real_mean: float) -> str:
    """How close generated slices are to the training set, against unseen real patients."""
    if gen_mean - real_mean > 0.05:
        return ("closer to the training set than unseen real patients are — memorisation or averaging "
                "towards typical training anatomy")
    return "about as close to the training set as unseen real patients are"


def privacy_sentence(metrics: dict) -> str:
    share, real_share = metrics.get("privacy_generated_share_above"), metrics.get("privacy_real_share_above")
    gen, real = metrics.get("privacy_generated_similarity_mean"), metrics.get("privacy_real_similarity_mean")
    if share is None or gen is None or real is None:
        return "Privacy check not available."
    n = metrics.get("n_test_slices")
    return (f"<b>Privacy</b>: {share:.0%} of {n} generated slices exceed the similarity threshold "
            f"{metrics.get('privacy_threshold', '?')} to their nearest training slice (real test slices: "
            f"{real_share:.0%}); mean similarity {gen:.3f} against {real:.3f} — generated slices are "
            f"{privacy_verdict(gen, real)}.")


def plain_reading(metrics: dict, ci: dict) -> str:
    """The one-paragraph answer (HTML)."""
    parts = [f"On {metrics.get('n_test_cases', '?')} test patients ({metrics.get('n_test_slices', '?')} "
             f"slices), generated slices reach SSIM {with_interval(metrics, ci, 'ssim')} and a mean absolute "
             f"error of {with_interval(metrics, ci, 'mae_hu')} HU against the real slices (95 % intervals "
             f"over patients in brackets).", floor_reading(metrics, ci)]
    if metrics.get("dice_generated_mean") is not None:
        parts.append(f"The segmenter trained on real slices finds the structures in generated slices with "
                     f"mean Dice {with_interval(metrics, ci, 'dice_generated_mean')}, against "
                     f"{with_interval(metrics, ci, 'dice_real_mean')} in the real ones.")
    weakest = weakest_structure(metrics)
    if weakest:
        parts.append(weakest)
    if metrics.get("zcons_ssim_ratio") is not None and metrics.get("zgrad_ratio") is not None:
        parts.append(f"Along z, stacked generated slices are {metrics['zcons_ssim_ratio']:.2f}× as consistent "
                     f"between neighbours as real ones, with {metrics['zgrad_ratio']:.2f}× their through-plane "
                     f"gradient (1 = as real).")
    if metrics.get("utility_dice_synthetic") is not None and metrics.get("utility_dice_real") is not None:
        parts.append(utility_reading(metrics, ci))
    if metrics.get("fid_inception") is not None:
        parts.append(f"Standard FID: {with_interval(metrics, ci, 'fid_inception')} (floor "
                     f"{with_interval(metrics, ci, 'fid_inception_floor')}).")
    return " ".join(_esc_keep_b(p) for p in parts)


def utility_reading(metrics: dict, ci: dict) -> str:
    """Does synthetic data help segmentation, in one or two sentences."""
    text = (f"<b>Synthetic data</b>: a segmenter trained only on {metrics.get('utility_n_synthetic_cases', '?')} "
            f"synthetic cases reaches Dice {with_interval(metrics, ci, 'utility_dice_synthetic')} on real test "
            f"slices, {with_interval(metrics, ci, 'utility_ratio_synthetic')}× the real-only "
            f"{with_interval(metrics, ci, 'utility_dice_real')}.")
    gain = metrics.get("utility_gain_mixed")
    if gain is not None:
        text += (f" Added to the real training slices they change Dice by "
                 f"{with_interval(metrics, ci, 'utility_gain_mixed')} "
                 f"({with_interval(metrics, ci, 'utility_dice_mixed')}).")
    return text


def _esc_keep_b(text: str) -> str:
    return _esc(text).replace("&lt;b&gt;", "<b>").replace("&lt;/b&gt;", "</b>")


def _short(reason: str, limit: int = 110) -> str:
    return reason if len(reason) <= limit else reason[:limit].rsplit(" ", 1)[0] + " …"


def headline_table(metrics: dict, ci: dict, reasons: dict) -> str:
    rows = []
    for label, key, better, floor_key, floor_what in HEADLINE:
        if key not in metrics:
            continue
        if metrics[key] is None:
            reason = reasons.get(key, "no reason recorded")
            value = (f"<td class='note' colspan='3' title='{_esc(reason)}'>not computed — "
                     f"{_esc(_short(reason))} (full reason under Metrics)</td>")
        else:
            floor = (f"{_esc(with_interval(metrics, ci, floor_key))}<br><span class='muted'>{_esc(floor_what)}</span>"
                     if floor_key and metrics.get(floor_key) is not None else "—")
            value = (f"<td class='num'>{_esc(with_interval(metrics, ci, key))}</td>"
                     f"<td class='num'>{floor}</td><td>{better}</td>")
        rows.append(f"<tr><td>{_esc(label)} <code class='muted'>{_esc(key)}</code></td>{value}</tr>")
    return ("<table class='headline'><tr><th>metric</th><th>generated vs real [95 % interval]</th>"
            "<th>as good as real gets</th><th>better</th></tr>" + "".join(rows) + "</table>")


def headline_text(metrics: dict, ci: dict, reasons: dict | None = None) -> str:
    """The headline table as plain text (for the log of the evaluate stage)."""
    def iv(key):
        i = ci.get(f"{key}_ci95")
        return f"[{_num(i['lo'])}, {_num(i['hi'])}]" if i and i.get("lo") is not None else ""

    lines = [f"{'metric':<21} {'value':>9}  {'95 % interval':<22} as good as real gets [95 % interval]"]
    for _, key, _, floor_key, _ in HEADLINE:
        if key not in metrics:
            continue
        if metrics[key] is None:
            lines.append(f"{key:<21} {'null':>9}  {_short((reasons or {}).get(key, ''), 90)}")
            continue
        floor = f"{_num(metrics[floor_key])} {iv(floor_key)}" if metrics.get(floor_key) is not None else ""
        lines.append(f"{key:<21} {_num(metrics[key]):>9}  {iv(key):<22} {floor}".rstrip())
    return "\n".join(lines)


def section_summary(metrics: dict | None, ci: dict, reasons: dict, grid_html: str) -> str:
    """The first screen: reading + headline table (left), one sample grid (right)."""
    if metrics is None:
        return "<p class='note'>Summary not available — reports/metrics.json not found.</p>" + grid_html
    reading = plain_reading(metrics, ci)
    return (f"<div class='summary'><div><p class='reading'>{reading}</p>"
            f"<p class='privacy'>{_esc_keep_b(privacy_sentence(metrics))}</p>"
            f"{headline_table(metrics, ci, reasons)}</div><div>{grid_html}</div></div>")


def first_grid(generated_dir: Path) -> Path | None:
    grids = sorted((Path(generated_dir) / "grids").glob("*.png"))
    return grids[0] if grids else None
