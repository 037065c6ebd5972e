"""The report's first screen: the answer before the details.

One paragraph in plain words (how close generated slices are to real ones, relative to the
noise floor; the weakest structure), the realism verdict (as good as real only when every
realism check's interval reaches its reference), the privacy verdict, the headline metrics with their
95 % intervals and noise floors, and one sample grid. Everything is read from what evaluate
wrote (``metrics.json``, ``metrics_ci.json``, ``metrics_notes.json``) and generate's grids;
nothing is recomputed, and a missing file leaves a short note instead.
"""
from __future__ import annotations

import html
from pathlib import Path

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


def _reaches(res: Results, key: str, reference: float, one_sided_below: bool = False) -> bool | None:
    """Does ``key``'s interval reach ``reference`` (contain it; ``one_sided_below``: its low end is at
    or below it)? None when the value or its interval is missing."""
    if key not in res or res.value(key) is None or res[key].interval is None:
        return None
    iv = res[key].interval
    return iv.lo <= reference if one_sided_below else iv.lo <= reference <= iv.hi


def realism_checks(res: Results) -> list[tuple[str, bool | None, str]]:
    """The realism checks behind the verdict: (name, reaches its reference?, phrase). A check
    passes only when its 95 % interval reaches the reference (AUC 0.5, ratio 1, bias 0)."""
    out = []
    if res.value("c2st_auc") is not None:
        control = res.value("c2st_auc_control")
        out.append(("classifier", _reaches(res, "c2st_auc", 0.5, one_sided_below=True),
                    f"a classifier trained on the validation patients tells generated from real test slices with "
                    f"AUC {res.shown('c2st_auc')} (0.5 = it cannot" + (f"; real vs real: {control:.2f}" if control
                                                                        is not None else "") + ")"))
    for key, what in (("texture_std_ratio", "texture: the fine residual is {v}× the real one"),
                      ("flicker_ratio", "flicker along z: {v}× the real slice-to-slice change"),
                      ("contrast_spread_ratio", "contrast: the between-patient spread is {v}× the real one")):
        if res.value(key) is not None:
            out.append((key, _reaches(res, key, 1.0), what.format(v=res.shown(key))))
    bands = [k for k in (f"texture_nps_ratio_band{i}" for i in range(1, 9)) if res.value(k) is not None]
    if bands:
        missed = [k for k in bands if _reaches(res, k, 1.0) is not True]
        out.append(("texture spectrum", not missed if all(_reaches(res, k, 1.0) is not None for k in bands) else None,
                    f"texture spectrum: generated / real power {min(res.value(k) for k in bands):.2f}–"
                    f"{max(res.value(k) for k in bands):.2f} over {len(bands)} frequency bands"))
    biased = [(abs(res.value(f"contrast_bias_hu_{s}")), s) for s in STRUCTURES
              if res.value(f"contrast_bias_hu_{s}") is not None]
    if biased:
        missed = [s for _, s in sorted(biased, reverse=True) if _reaches(res, f"contrast_bias_hu_{s}", 0.0) is False]
        worst = max(biased)[1]
        if missed:
            way = "too bright" if res.value(f"contrast_bias_hu_{missed[0]}") > 0 else "too dark"
            phrase = (f"contrast: {', '.join(missed)} drawn {way} (largest: {missed[0]} by "
                      f"{res.shown(f'contrast_bias_hu_{missed[0]}')} HU)")
        else:
            phrase = (f"contrast: every structure's mean HU within reach of the real one (largest bias: {worst} "
                      f"{res.shown(f'contrast_bias_hu_{worst}')} HU)")
        known = all(_reaches(res, f"contrast_bias_hu_{s}", 0.0) is not None for _, s in biased)
        out.append(("contrast bias", not missed if known else None, phrase))
    return out


def realism_reading(res: Results) -> str:
    """The realism verdict (HTML): 'as good as real' only when every check's interval reaches its
    reference; otherwise the checks that miss, then the ones that pass."""
    checks = realism_checks(res)
    if not checks:
        return "<b>Realism</b>: not measured (no realism metrics in reports/metrics.json)."
    missed = [phrase for _, ok, phrase in checks if ok is False]
    unknown = [name for _, ok, name in ((None, ok, n) for n, ok, _ in checks) if ok is None]
    passed = [phrase for _, ok, phrase in checks if ok is True]
    if missed:
        text = "; ".join(missed)
        head = "<b>Realism: not as good as real.</b> " + text[:1].upper() + text[1:] + "."
    elif unknown:
        head = (f"<b>Realism: not shown to be as good as real</b> (no interval for {', '.join(unknown)}; "
                f"evaluate.bootstrap 0 turns intervals off).")
    else:
        head = "<b>Realism: as good as real</b> on every check (each 95 % interval reaches its reference)."
    tail = (f" Not told apart from real with {res.value('n_test_cases', '?')} test patients: " + "; ".join(passed)
            + ".") if passed and (missed or unknown) else ""
    return head + tail + " Intervals: the test patients of this one trained model (docs/metrics.md, realism)."


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
    parts = [f"On {res.value('n_test_cases', '?')} test patients ({res.value('n_test_slices', '?')} "
             f"slices), generated slices reach SSIM {res.shown('ssim')} and a mean absolute "
             f"error of {res.shown('mae_hu')} HU against the real slices (95 % intervals "
             f"over patients in brackets).", floor_reading(res)]
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


def headline_table(res: Results) -> str:
    """The registry's headline rows: value [interval], the noise floor beside it, which way is better."""
    rows = []
    for spec in table_rows():
        if spec.key not in res:
            continue
        if res.value(spec.key) is None:
            reason = res[spec.key].null_reason or "no reason recorded"
            value = (f"<td class='note' colspan='3' title='{esc(reason)}'>not computed — "
                     f"{esc(short(reason))} (full reason under Metrics)</td>")
        else:
            floor = (f"{esc(res.shown(spec.floor))}<br><span class='muted'>{esc(spec.floor_what)}</span>"
                     if spec.floor and res.value(spec.floor) is not None else "—")
            value = (f"<td class='num'>{esc(res.shown(spec.key))}</td>"
                     f"<td class='num'>{floor}</td><td>{spec.better}</td>")
        rows.append(f"<tr><td>{esc(spec.label)} <code class='muted'>{esc(spec.key)}</code></td>{value}</tr>")
    return ("<table class='headline'><tr><th>metric</th><th>generated vs real [95 % interval]</th>"
            "<th>as good as real gets</th><th>better</th></tr>" + "".join(rows) + "</table>")


def section_summary(res: Results | None, grid_html: str) -> str:
    """The first screen: reading + headline table (left), one sample grid (right)."""
    if res is None:
        return "<p class='note'>Summary not available — reports/metrics.json not found.</p>" + grid_html
    reading = plain_reading(res)
    return (f"<div class='summary'><div><p class='reading'>{reading}</p>"
            f"<p class='realism'>{_esc_keep_b(realism_reading(res))}</p>"
            f"<p class='privacy'>{_esc_keep_b(privacy_sentence(res))}</p>"
            f"{headline_table(res)}</div><div>{grid_html}</div></div>")


def first_grid(generated_dir: Path) -> Path | None:
    grids = sorted((Path(generated_dir) / "grids").glob("*.png"))
    return grids[0] if grids else None
