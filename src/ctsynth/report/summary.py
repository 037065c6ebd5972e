"""The report's first screen: the answer before the details.

One paragraph in plain words (how close generated slices are to real ones, relative to the
noise floor; the weakest structure), the realism verdict (as good as real only when every
realism check's interval, pooled and per structure, lies inside its stated margin), the privacy
verdict, the headline metrics with their 95 % intervals and noise floors, and one sample grid.
Everything is read from what evaluate wrote (``metrics.json``, ``metrics_ci.json``,
``metrics_notes.json``) and generate's grids; nothing is recomputed, and a missing file leaves a short note instead.
"""
from __future__ import annotations

import html
from pathlib import Path

from ctsynth.core.config import VerdictCfg
from ctsynth.core.labels import STRUCTURES
from ctsynth.evaluate.registry import short, table_rows
from ctsynth.evaluate.results import Results


def esc(value) -> str:
    return html.escape(str(value))


def floor_reading(res: Results) -> str:
    """Generated vs real in the segmenter's features, like with like: generated and real test slices
    against the same unseen (validation) patients; the verdict is the interval of their paired gap."""
    floor, vs_val = res.value("fd_seg_floor"), res.value("fd_seg_vs_val")
    if vs_val is None or floor is None:
        if res.value("fd_seg") is None:
            return "The feature-space distance (fd_seg) was not computed."
        return (f"In the segmenter's features generated slices lie at FD {res.shown('fd_seg')} "
                f"from their real counterparts; no noise floor was computed (it needs validation patients).")
    gap = res["fd_seg_gap"].interval if "fd_seg_gap" in res else None
    n = f"{res.value('n_test_cases', '?')} test and {res.value('n_val_cases', '?')} validation patients"
    if gap is None:
        verdict = "no interval for their difference could be computed"
    elif gap.lo > 0:
        verdict = f"further than real slices: the gap {res.shown('fd_seg_gap')} excludes 0"
    elif gap.hi < 0:
        verdict = f"closer than real slices: the gap {res.shown('fd_seg_gap')} lies below 0"
    else:
        verdict = (f"the gap {res.shown('fd_seg_gap')} includes 0: with {n} the difference from real slices "
                   f"is not resolved")
    return (f"Against unseen real patients (the validation set) in the segmenter's features, generated test "
            f"slices lie at FD {res.shown('fd_seg_vs_val')} and real test slices at {res.shown('fd_seg_floor')} "
            f"(the noise floor) — {verdict}. This feature space was trained to find structures, not to see texture.")


def _inside(res: Results, key: str, lo: float, hi: float) -> bool | None:
    """Does ``key``'s 95 % interval lie inside [lo, hi] (equivalence within the margin)? None when
    the value or its interval is missing."""
    if key not in res or res.value(key) is None or res[key].interval is None:
        return None
    iv = res[key].interval
    return lo <= iv.lo and iv.hi <= hi


RATIO_FAMILIES = (("texture_std_ratio", "texture (fine residual, generated / real)",
                   [*STRUCTURES, "lung", "soft_tissue"]),
                  ("flicker_ratio", "flicker along z (generated / real)", list(STRUCTURES)),
                  ("contrast_spread_ratio", "between-patient contrast spread (generated / real)", list(STRUCTURES)))


def _family(res: Results, name: str, keys: list[tuple[str, str]], lo: float, hi: float, what: str):
    """One check over a family of keys ((key, part name)): passes when every present key's interval
    lies inside [lo, hi]; the phrase names every part that does not."""
    present = [(k, part) for k, part in keys if k in res and res.value(k) is not None]
    if not present:
        return None
    verdicts = {k: _inside(res, k, lo, hi) for k, _ in present}
    failed = [f"{part} {res.shown(k)}" for k, part in present if verdicts[k] is False]
    unknown = any(v is None for v in verdicts.values())
    if failed:
        phrase = f"{what}: outside [{lo:g}, {hi:g}] — " + "; ".join(failed)
    else:
        phrase = f"{what}: every one of {len(present)} inside [{lo:g}, {hi:g}]"
    return name, (False if failed else None if unknown else True), phrase


def realism_checks(res: Results, margins=None) -> list[tuple[str, bool | None, str]]:
    """The realism checks behind the verdict: (name, inside its margin?, phrase). A check passes
    only when its 95 % interval lies inside the equivalence margin stated in ``params.verdict``
    (``margins``; None: the defaults): ratios inside [1/m, m], biases inside ±m HU, the classifier
    AUC's interval below its margin, for the pooled value and every structure. The classifier's
    check is undecided when the test missed its positive control (blurred real slices)."""
    margins = margins or VerdictCfg()
    m, out = float(margins.margin_ratio), []
    if res.value("c2st_auc") is not None:
        ok = _inside(res, "c2st_auc", 0.0, float(margins.margin_auc))
        p, p_blur = res.value("c2st_p"), res.value("c2st_p_blur")
        phrase = (f"a classifier trained on the validation patients tells generated from real test slices with "
                  f"AUC {res.shown('c2st_auc')} (margin: below {margins.margin_auc:g}"
                  + (f"; permutation p = {p:.3g}" if p is not None else "") + ")")
        if p_blur is not None:
            caught = p_blur < 0.01
            phrase += (f"; its positive control (real vs real blurred) {'caught' if caught else 'MISSED'}: AUC "
                       f"{res.shown('c2st_auc_blur')}, p = {p_blur:.3g}")
            if not caught and ok:
                ok = None
        out.append(("classifier", ok, phrase))
    for key, what, parts in RATIO_FAMILIES:
        found = _family(res, key, [(key, "pooled")] + [(f"{key}_{s}", s) for s in parts], 1 / m, m, what)
        if found:
            out.append(found)
    bands = [(k, f"band {k[-1]}") for k in (f"texture_nps_ratio_band{i}" for i in range(1, 9)) if k in res]
    found = _family(res, "texture spectrum", bands, 1 / m, m, "texture spectrum (generated / real power)")
    if found:
        out.append(found)
    b = float(margins.margin_bias_hu)
    found = _family(res, "contrast bias", [(f"contrast_bias_hu_{s}", s) for s in STRUCTURES], -b, b,
                    "contrast bias (mean HU, generated − real)")
    if found:
        out.append(found)
    return out


def realism_reading(res: Results, margins=None) -> str:
    """The realism verdict (HTML): 'as good as real' only when every check's interval lies inside
    its margin; otherwise every check (and every structure) that does not, then the ones that do."""
    checks = realism_checks(res, margins)
    if not checks:
        return "<b>Realism</b>: not measured (no realism metrics in reports/metrics.json)."
    missed = [phrase for _, ok, phrase in checks if ok is False]
    unknown = [phrase for _, ok, phrase in checks if ok is None]
    passed = [phrase for _, ok, phrase in checks if ok is True]
    if missed:
        text = "; ".join(missed)
        head = "<b>Realism: not as good as real.</b> " + text[:1].upper() + text[1:] + "."
    elif unknown:
        head = (f"<b>Realism: not shown to be as good as real</b> (undecided, without an interval or with a "
                f"classifier that missed its positive control: {'; '.join(unknown)}).")
    else:
        head = "<b>Realism: as good as real</b> on every check (each 95 % interval inside its margin)."
    tail = (f" Inside the margins with {res.value('n_test_cases', '?')} test patients: " + "; ".join(passed)
            + ".") if passed and (missed or unknown) else ""
    margins = margins or VerdictCfg()
    return (head + tail + f" Margins (params.verdict): ratios inside [1/{margins.margin_ratio:g}, "
            f"{margins.margin_ratio:g}] (80–125 % is equivalence testing's usual margin), biases within "
            f"±{margins.margin_bias_hu:g} HU, AUC below {margins.margin_auc:g}; intervals: the test patients of "
            f"this one trained model (docs/metrics.md, realism).")


def weakest_structure(res: Results) -> str | None:
    """The structure generated worst relative to the real ceiling (lowest Dice ratio), as a phrase."""
    scored = []
    for s in STRUCTURES:
        gen, real = res.value(f"dice_generated_{s}"), res.value(f"dice_real_{s}")
        if gen is not None and real:
            scored.append((gen / real, s, gen, real))
    if not scored:
        return None
    _, s, gen, real = min(scored)
    mae = res.value(f"mae_hu_{s}")
    return (f"The weakest structure is <b>{esc(s)}</b>: the segmenter finds it in generated slices with "
            f"Dice {gen:.2f} against {real:.2f} in the real ones" + (f", MAE {mae:.0f} HU inside it" if mae else "")
            + ".")


def privacy_verdict(gen_mean: float, real_mean: float) -> str:
    """How close generated slices are to the training set, against unseen real patients."""
    if gen_mean - real_mean > 0.05:
        return ("closer to the training set than unseen real patients are — memorisation or averaging "
                "towards typical training anatomy")
    return "about as close to the training set as unseen real patients are"


def privacy_sentence(res: Results) -> str:
    share, real_share = res.value("privacy_generated_share_above"), res.value("privacy_real_share_above")
    gen, real = res.value("privacy_generated_similarity_mean"), res.value("privacy_real_similarity_mean")
    if share is None or gen is None or real is None:
        return "Privacy check not available."
    n = res.value("n_test_slices")
    return (f"<b>Privacy</b>: {share:.0%} of {n} generated slices exceed the similarity threshold "
            f"{res.value('privacy_threshold', '?')} to their nearest training slice (real test slices: "
            f"{real_share:.0%}); mean similarity {gen:.3f} against {real:.3f} — generated slices are "
            f"{privacy_verdict(gen, real)}.")


def plain_reading(res: Results) -> str:
    """The one-paragraph answer (HTML)."""
    where = f"On {res.value('n_test_cases', '?')} test patients ({res.value('n_test_slices', '?')} slices)"
    if res.value("heart_only_ssim") is not None:
        first = (f"{where}, drawn from the heart masks alone (the paper's condition), generated slices reach SSIM "
                 f"{res.shown('heart_only_ssim')} and a mean absolute error of {res.shown('heart_only_mae_hu')} HU "
                 f"against the real slices (95 % intervals over patients in brackets). Given also body, lung and "
                 f"bone thresholded from each patient's own CT (which carries much of the image it is scored "
                 f"against), they reach SSIM {res.shown('ssim')} and {res.shown('mae_hu')} HU; the figures below "
                 f"are for that condition unless they say heart only.")
    else:
        first = (f"{where}, generated slices reach SSIM {res.shown('ssim')} and a mean absolute "
                 f"error of {res.shown('mae_hu')} HU against the real slices (95 % intervals "
                 f"over patients in brackets).")
    parts = [first, floor_reading(res)]
    if res.value("dice_generated_mean") is not None:
        parts.append(f"The segmenter trained on real slices finds the structures in generated slices with "
                     f"mean Dice {res.shown('dice_generated_mean')}, against "
                     f"{res.shown('dice_real_mean')} in the real ones.")
    weakest = weakest_structure(res)
    if weakest:
        parts.append(weakest)
    if res.value("flicker_ratio") is not None:
        parts.append(f"Along z, with each slice's own noise blurred away, stacked generated slices change from one "
                     f"slice to the next {res.shown('flicker_ratio')}× as much as real ones (1 = as real).")
    if res.value("utility_dice_synthetic") is not None and res.value("utility_dice_real") is not None:
        parts.append(utility_reading(res))
    if res.value("fid_inception") is not None:
        parts.append(f"Standard FID: {res.shown('fid_inception')} (floor "
                     f"{res.shown('fid_inception_floor')}).")
    return " ".join(_esc_keep_b(p) for p in parts)


def utility_reading(res: Results) -> str:
    """Does synthetic data help segmentation, in one or two sentences."""
    text = (f"<b>Synthetic data</b>: a segmenter trained only on {res.value('utility_n_synthetic_cases', '?')} "
            f"synthetic cases reaches Dice {res.shown('utility_dice_synthetic')} on real test "
            f"slices, {res.shown('utility_ratio_synthetic')}× the real-only "
            f"{res.shown('utility_dice_real')}.")
    gain = res.value("utility_gain_mixed")
    if gain is not None:
        text += (f" Added to the real training slices they change Dice by "
                 f"{res.shown('utility_gain_mixed')} "
                 f"({res.shown('utility_dice_mixed')}).")
    return text


def _esc_keep_b(text: str) -> str:
    return esc(text).replace("&lt;b&gt;", "<b>").replace("&lt;/b&gt;", "</b>")


CONDITION_ANATOMY = "heart masks + body, lung, bone thresholded from the scored patient's CT"
CONDITION_HEART = "heart masks alone (the paper's condition)"


def headline_table(res: Results) -> str:
    """The registry's headline rows: value [interval] for each condition the generator was scored
    with (heart masks alone, the paper's; and with the anatomy channels, which here are thresholded
    from the scored patient's own CT), the noise floor beside them, which way is better."""
    alone = any(spec.heart_only and res.value(spec.heart_only) is not None for spec in table_rows())
    rows = []
    for spec in table_rows():
        if spec.key not in res:
            continue
        if res.value(spec.key) is None:
            reason = res[spec.key].null_reason or "no reason recorded"
            value = (f"<td class='note' colspan='{4 if alone else 3}' title='{esc(reason)}'>not computed — "
                     f"{esc(short(reason))} (full reason under Metrics)</td>")
        else:
            floor = (f"{esc(res.shown(spec.floor))}<br><span class='muted'>{esc(spec.floor_what)}</span>"
                     if spec.floor and res.value(spec.floor) is not None else "—")
            heart = ""
            if alone:
                heart = (f"<td class='num'>{esc(res.shown(spec.heart_only))}</td>"
                         if spec.heart_only and res.value(spec.heart_only) is not None else "<td>—</td>")
            value = (f"{heart}<td class='num'>{esc(res.shown(spec.key))}</td>"
                     f"<td class='num'>{floor}</td><td>{spec.better}</td>")
        rows.append(f"<tr><td>{esc(spec.label)} <code class='muted'>{esc(spec.key)}</code></td>{value}</tr>")
    heads = (f"<th>{esc(CONDITION_HEART)} [95 %]</th><th>{esc(CONDITION_ANATOMY)} [95 %]</th>" if alone
             else "<th>generated vs real [95 % interval]</th>")
    return (f"<table class='headline'><tr><th>metric (test patients)</th>{heads}"
            "<th>as good as real gets</th><th>better</th></tr>" + "".join(rows) + "</table>")


def section_summary(res: Results | None, grid_html: str, margins=None) -> str:
    """The first screen: reading + headline table (left), one sample grid (right)."""
    if res is None:
        return "<p class='note'>Summary not available — reports/metrics.json not found.</p>" + grid_html
    reading = plain_reading(res)
    return (f"<div class='summary'><div><p class='reading'>{reading}</p>"
            f"<p class='realism'>{_esc_keep_b(realism_reading(res, margins))}</p>"
            f"<p class='privacy'>{_esc_keep_b(privacy_sentence(res))}</p>"
            f"{headline_table(res)}</div><div>{grid_html}</div></div>")


def first_grid(generated_dir: Path) -> Path | None:
    grids = sorted((Path(generated_dir) / "grids").glob("*.png"))
    return grids[0] if grids else None
