"""Every metric the evaluation reports, declared once.

:data:`METRICS` declares each metric: its key (``<S>`` stands for a structure name), its group, its
definition, and how it is shown -- ``headline`` metrics go to ``reports/headline.json`` (the file
``dvc exp show`` reads: at most ~15 columns), to the top section of MLflow's run page and to the
evaluate log; metrics with a ``label`` are rows of the report's first table, beside their noise
``floor``. Everything else derives from it, through the one result type of
:mod:`ctsynth.evaluate.results`:

* ``metrics.json`` (every value, or null), ``metrics_ci.json`` (``{"<key>_ci95": {"lo", "hi"}}``),
  ``headline.json`` and the null reasons in ``metrics_notes.json``: ``Results.write``;
* MLflow names, grouped by prefix so the run page opens on the headline: ``Results.mlflow``;
* the report's tables (:mod:`ctsynth.report.report`, :mod:`ctsynth.report.summary`);
* ``docs/metrics.md``: ``python -m ctsynth.evaluate.registry > docs/metrics.md`` (a test holds
  the file to the registry).

A new metric: one :class:`Metric` entry here, and its value (and interval, if it has one) set on
the ``Results`` of the evaluation where it is computed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ctsynth.core.labels import STRUCTURES
from ctsynth.evaluate.bootstrap import LEVEL

SUFFIX = f"_ci{round(100 * LEVEL)}"          # "_ci95": the interval keys of metrics_ci.json
GROUPS = {
    "counts": "how much was evaluated",
    "paired": "generated vs its real slice, pixel by pixel",
    "distribution": "distance between the generated and real slice distributions, with noise floors",
    "segmentation": "does a segmenter trained on real slices find the structures in generated ones",
    "privacy": "how close generated slices come to the training slices",
    "throughplane": "volumes, not a stack of slices: consistency along z and tri-planar distances",
    "utility": "does synthetic data help a segmenter (the utility stage)",
    "heart_only": "the paper's condition: test slices drawn from the heart masks alone, for a generator that also "
                  "learned to draw with the anatomy (train.anatomy_drop > 0); the headline's other metrics give it "
                  "body, lung and bone thresholded from the scored patient's own CT",
    "realism": "what the paired metrics and the segmenter's features do not see: can a classifier tell generated "
               "from real, texture, contrast between patients (flicker along z: flicker_ratio, throughplane)",
}


@dataclass(frozen=True)
class Metric:
    """One metric's declaration (``key`` may hold ``<S>``: one metric per structure)."""

    key: str
    group: str
    definition: str
    headline: bool = False        # headline.json / dvc exp show, MLflow's top section, the evaluate log
    label: str = ""               # a row of the report's headline table, named so
    better: str = ""              # "higher" | "lower" | "≈ 1" | "≈ 0.5" (report table)
    floor: str = ""               # key of the reference shown beside it (noise floor or ceiling)
    floor_what: str = ""          # what that reference is
    heart_only: str = ""          # key of the same metric for slices drawn from the heart masks alone


def _gap_definition(key: str, features: str) -> str:
    return (f"{key}_vs_val − {key}_floor: how much further generated test slices lie from the real validation "
            f"patients than the real test slices do ({features}; same patients, same sizes). ≈ 0: as good as real "
            f"at this size; its interval is resampled paired (the same patients left out of both terms)")


METRICS: tuple[Metric, ...] = (
    Metric('n_test_slices', 'counts',
           'number of generated test slices evaluated (each paired with its real slice)'),
    Metric('n_test_cases', 'counts',
           'number of test patients the evaluated slices come from',
           headline=True),
    Metric('ssim', 'paired',
           'structural similarity, piq (11-px Gaussian window), data_range 1.0 = the HU window mapped to [0, 1], '
           'mean over slices (1 = identical)',
           headline=True, label='SSIM', better='higher', heart_only='heart_only_ssim'),
    Metric('psnr', 'paired',
           'peak signal-to-noise ratio in dB, piq, data_range 1.0 = the HU window mapped to [0, 1], mean over slices'
           ' (higher is better)',
           label='PSNR (dB)', better='higher', heart_only='heart_only_psnr'),
    Metric('mae_hu', 'paired',
           'mean absolute error in Hounsfield units over all pixels of all slices (lower is better)',
           headline=True, label='MAE (HU)', better='lower', heart_only='heart_only_mae_hu'),
    Metric('mse', 'paired',
           'mean squared error between generated and real slices in model space [-1, 1] (lower is better)',
           label='MSE ([-1, 1] space)', better='lower', heart_only='heart_only_mse'),
    Metric('mae_hu_background', 'paired',
           'mean absolute HU error over background pixels (outside every selected structure)'),
    Metric('mae_hu_<S>', 'paired',
           "mean absolute HU error over the pixels of structure <S>'s mask"),
    Metric('dice_generated_<S>', 'segmentation',
           "Dice of the segmenter's prediction on generated slices vs the mask they were generated from, structure"
           ' <S> (null when <S> is absent from the test ground truth: never scored as 1)'),
    Metric('dice_real_<S>', 'segmentation',
           'Dice of the segmenter on the real test slices vs their masks (the ceiling for dice_generated_<S>; null '
           'when <S> is absent from the test ground truth)'),
    Metric('dice_generated_mean', 'segmentation',
           'mean of dice_generated_<S> over the selected structures present in the test ground truth (absent ones '
           'are null and left out)',
           headline=True, label='Dice of generated slices (mean)', better='higher',
           floor='dice_real_mean', floor_what='segmenter on the real slices (ceiling)',
           heart_only='heart_only_dice_generated_mean'),
    Metric('dice_real_mean', 'segmentation',
           'mean of dice_real_<S> over the selected structures present in the test ground truth'),
    Metric('fd_seg', 'distribution',
           "Fréchet distance (exact, float64) between real and generated test slices in the segmenter's encoder "
           'features, each patient paired with their own real slices (no floor compares like with this: see '
           'fd_seg_vs_val and fd_seg_gap)',
           label='FD to own real slices (paired)', better='lower'),
    Metric('fd_seg_vs_val', 'distribution',
           "Fréchet distance between generated test slices and real validation slices: the floor's comparison with "
           'generated slices in place of the real test slices (same patients, same sizes)',
           label='FD to unseen patients', better='lower',
           floor='fd_seg_floor', floor_what='same comparison, real test slices'),
    Metric('fd_seg_floor', 'distribution',
           'noise floor: Fréchet distance between real validation and real test slices in the same features (what '
           "'as good as real' gets)"),
    Metric('fd_seg_gap', 'distribution',
           _gap_definition('fd_seg', 'segmenter features'),
           headline=True, label='FD gap to real (generated − real, vs unseen patients)', better='lower'),
    Metric('kid_seg', 'distribution',
           "kernel distance (piq KID, unbiased MMD², disjoint subsets) between real and generated test slices in the "
           "segmenter's encoder features, patients paired with their own real slices; ≈ 0 for matching distributions"),
    Metric('kid_seg_floor', 'distribution',
           'noise floor of kid_seg_vs_val: KID between real validation and real test slices in the same features'),
    Metric('kid_seg_vs_val', 'distribution',
           'KID between generated test slices and real validation slices (compare with kid_seg_floor)',
           label='KID to unseen patients, segmenter features', better='lower',
           floor='kid_seg_floor', floor_what='same comparison, real test slices'),
    Metric('kid_seg_gap', 'distribution',
           _gap_definition('kid_seg', 'segmenter features, KID')),
    Metric('fid_inception', 'distribution',
           'FID: Fréchet distance between real and generated test slices in InceptionV3 pool3 features (standard FID'
           ' Inception weights or a local file); null when no weights could be had',
           headline=True, label='FID (Inception)', better='lower'),
    Metric('fid_inception_floor', 'distribution',
           "noise floor: the same distance between real validation and real test slices (what 'as good as real' "
           'gets)'),
    Metric('fid_inception_vs_val', 'distribution',
           'Fréchet distance between generated test slices and real validation slices in InceptionV3 features: the'
           " floor's comparison with generated slices in place of the real test slices",
           label='FID to unseen patients', better='lower',
           floor='fid_inception_floor', floor_what='same comparison, real test slices'),
    Metric('fid_inception_gap', 'distribution',
           _gap_definition('fid_inception', 'InceptionV3 features')),
    Metric('kid_inception', 'distribution',
           'kernel inception distance (piq KID, cubic polynomial kernel) between real and generated test slices in '
           'InceptionV3 pool3 features; null when no weights could be had'),
    Metric('kid_inception_floor', 'distribution',
           'noise floor of kid_inception_vs_val: KID between real validation and real test slices'),
    Metric('kid_inception_vs_val', 'distribution',
           'KID between generated test slices and real validation slices in InceptionV3 features',
           label='KID to unseen patients (Inception)', better='lower',
           floor='kid_inception_floor', floor_what='same comparison, real test slices'),
    Metric('kid_inception_gap', 'distribution',
           _gap_definition('kid_inception', 'InceptionV3 features, KID')),
    Metric('n_val_slices', 'counts',
           'number of real validation slices (the reference set of the noise floors)'),
    Metric('n_val_cases', 'counts',
           'number of validation patients the noise-floor slices come from'),
    Metric('privacy_threshold', 'privacy',
           'in-body SSIM to the nearest training slice above which a generated slice is withheld: the smaller of '
           'privacy_threshold_calibrated and the cap privacy.max_similarity (either may be off)'),
    Metric('privacy_threshold_calibrated', 'privacy',
           'the privacy.quantile (0.99 by default) of the nearest-training in-body SSIM of the real validation '
           'slices: closer than this, a slice is closer to a training patient than that share of unseen patients '
           'ever are (null without validation patients or with privacy.quantile null)'),
    Metric('privacy_reference_similarity_max', 'privacy',
           'largest nearest-training in-body SSIM of any real validation slice (the calibration reference)'),
    Metric('privacy_n_reference_slices', 'privacy',
           'number of real validation slices the threshold was calibrated on'),
    Metric('privacy_generated_similarity_mean', 'privacy',
           'mean over generated slices of the in-body SSIM to their nearest training slice (SSIM map, 11-px '
           'Gaussian window as ssim, averaged over the union of both slices\' bodies: HU > -500, largest connected '
           'component, holes filled; against every training slice while privacy.exhaustive_budget allows, else '
           'among the privacy.candidates nearest by low-res L2)'),
    Metric('privacy_generated_similarity_max', 'privacy',
           'largest in-body SSIM of any generated slice to its nearest training slice'),
    Metric('privacy_generated_share_above', 'privacy',
           'share of generated slices whose nearest-training-slice in-body SSIM exceeds the threshold (withheld)',
           headline=True),
    Metric('privacy_real_similarity_mean', 'privacy',
           'baseline: mean in-body SSIM of real test slices to their nearest training slice'),
    Metric('privacy_real_similarity_max', 'privacy',
           'baseline: largest in-body SSIM of any real test slice to its nearest training slice'),
    Metric('privacy_real_share_above', 'privacy',
           'baseline: share of real test slices above the threshold'),
    Metric('zcons_ssim_ratio', 'throughplane',
           'adjacent-slice consistency inside the body: SSIM map (7-px uniform window) between neighbouring axial '
           'slices (z, z+1) averaged over the body pixels of either slice (body of the real volume: HU > -500, '
           'largest connected component, holes filled), generated test volumes / real ones (1 = as smooth along '
           'z as real; < 1 = flicker; the air is out, but the real slices\' own noise still hides flicker: see '
           'flicker_ratio)'),
    Metric('zcons_ssim_ratio_<S>', 'throughplane',
           'adjacent-slice consistency inside structure <S> (SSIM map averaged over its pixels in either slice of '
           'each pair), generated / real'),
    Metric('zcons_ssim_real', 'throughplane',
           'mean in-body SSIM between neighbouring axial slices of the real test volumes (denominator of '
           'zcons_ssim_ratio)'),
    Metric('zcons_ssim_generated', 'throughplane',
           'mean in-body SSIM between neighbouring axial slices of the generated test volumes (numerator of '
           'zcons_ssim_ratio)'),
    Metric('zgrad_ratio', 'throughplane',
           'through-plane gradient: mean |I(z+1) - I(z)| / dz over the same body pixels as zcons_ssim_ratio, '
           'generated / real (1 = as real; > 1 = rougher along z)'),
    Metric('zgrad_real', 'throughplane',
           'mean through-plane gradient |dI/dz| of the real test volumes inside the body, HU/mm'),
    Metric('zgrad_generated', 'throughplane',
           'mean through-plane gradient |dI/dz| of the generated test volumes inside the body, HU/mm'),
    Metric('flicker_ratio', 'throughplane',
           'flicker along z that noise cannot hide: mean |S(z+1) - S(z)| / dz over the body pixels of adjacent '
           'slices, S = each slice blurred in-plane (Gaussian, σ 1.5 px) so the per-slice noise is out, generated '
           '/ real (1 = as real; > 1 = the generated volume jumps from slice to slice: streaks in coronal and '
           'sagittal views)',
           headline=True, label='Flicker along z (generated / real)', better='≈ 1'),
    Metric('flicker_ratio_<S>', 'throughplane',
           'flicker_ratio over the pixels of structure <S> (in either slice of each pair)'),
    Metric('fd_tri_rand_axial', 'throughplane',
           'Fréchet distance between real and generated axial slices in fixed random-CNN features (orientation-'
           'agnostic: seeded, untrained, averaged over 8 rotations/flips); every plane: the slices cutting a '
           "structure, cropped to the body's bounding box of the real volume (no air padding) and resized to the "
           "store's size, each case giving each plane the same number (its smallest plane's count, evenly spaced, "
           'fixed seed)'),
    Metric('fd_tri_rand_coronal', 'throughplane',
           'Fréchet distance between real and generated coronal slices (body box, resized, as many as axial) in '
           'the same random-CNN features; sees flicker along z'),
    Metric('fd_tri_rand_sagittal', 'throughplane',
           'Fréchet distance between real and generated sagittal slices (body box, resized, as many as axial) in '
           'the same random-CNN features; sees flicker along z'),
    Metric('fd_tri_rand_mean', 'throughplane',
           'tri-planar (2.5-D) Fréchet distance: mean of fd_tri_rand_axial, _coronal and _sagittal (MAISI-style)'),
    Metric('fid_tri_inception_axial', 'throughplane',
           'FID on axial slices of the reassembled test volumes (InceptionV3 pool3; the same images as '
           'fd_tri_rand_axial); null without Inception weights'),
    Metric('fid_tri_inception_coronal', 'throughplane',
           'FID on coronal slices (body box, resized, as many as axial) of the reassembled test volumes; null '
           'without Inception weights'),
    Metric('fid_tri_inception_sagittal', 'throughplane',
           'FID on sagittal slices (body box, resized, as many as axial) of the reassembled test volumes; null '
           'without Inception weights'),
    Metric('fid_tri_inception_mean', 'throughplane',
           "tri-planar FID: mean of the axial, coronal and sagittal FIDs (MAISI's 2.5-D FID); null without "
           'Inception weights'),
    Metric('utility_dice_real', 'utility',
           'downstream utility: mean Dice over the structures present in the test ground truth, on the REAL test '
           "slices, of the segmenter trained on real training slices only (the segmenter stage's model)"),
    Metric('utility_dice_synthetic', 'utility',
           'downstream utility: mean Dice on the real test slices of the same segmenter (architecture, budget, '
           'seed) trained on the synthetic cases only'),
    Metric('utility_dice_mixed', 'utility',
           'downstream utility: mean Dice on the real test slices of the same segmenter trained on real training +'
           ' synthetic slices'),
    Metric('utility_dice_real_<S>', 'utility',
           'Dice of structure <S> on the real test slices, segmenter trained on real slices only'),
    Metric('utility_dice_synthetic_<S>', 'utility',
           'Dice of structure <S> on the real test slices, segmenter trained on synthetic slices only'),
    Metric('utility_dice_mixed_<S>', 'utility',
           'Dice of structure <S> on the real test slices, segmenter trained on real + synthetic slices'),
    Metric('utility_ratio_synthetic', 'utility',
           'utility_dice_synthetic / utility_dice_real (target >= 0.8: synthetic data alone teaches most of what '
           'real data does)'),
    Metric('utility_gain_mixed', 'utility',
           'utility_dice_mixed - utility_dice_real (> 0: adding synthetic cases helps; target >= -0.01)',
           headline=True),
    Metric('utility_n_synthetic_cases', 'utility',
           'number of synthetic cases (data/synthetic) the utility segmenters were trained on'),
    Metric('utility_n_synthetic_slices', 'utility',
           'number of synthetic slices (after preprocess) in the utility training sets'),
    Metric('utility_n_real_train_slices', 'utility',
           'number of real training slices of the real-only and mixed utility segmenters'),
    Metric('c2st_auc', 'realism',
           'classifier two-sample test: ROC AUC of a small CNN (realism.c2st_*) trained to tell real from '
           'generated slices of the validation patients, scored on the test patients\' real and generated slices '
           '(0.5 = it cannot tell them apart, 1 = always right), the mean over realism.c2st_repeats classifiers '
           '(seeds: the top-level seed, seed + 1, ...); interval: test patients left out in turn, the classifiers '
           'fixed',
           headline=True, label='Classifier AUC, real vs generated', better='≈ 0.5', heart_only='heart_only_c2st_auc'),
    Metric('c2st_p', 'realism',
           'one-sided p-value of c2st_auc under the null that real and generated slices are exchangeable within '
           'each test patient: every pattern of swapping whole patients\' labels (exact up to 16 patients; the '
           'smallest possible value is c2st_p_min)',
           headline=True),
    Metric('c2st_auc_blur', 'realism',
           'positive control of c2st_auc: the same classifiers trained on the validation patients\' real slices '
           'against themselves blurred by realism.control_blur_px (Gaussian σ), scored on the test patients\' '
           'likewise; a test that misses it has no power'),
    Metric('c2st_p_blur', 'realism',
           'p-value of c2st_auc_blur, as c2st_p (the control must be caught: < 0.01)'),
    Metric('c2st_p_min', 'realism',
           'the smallest p-value the permutation test allows with these test patients (2^-G for G patients)'),
    Metric('heart_only_ssim', 'heart_only',
           'ssim of the test slices drawn from the heart masks alone (the anatomy channels blank)', headline=True),
    Metric('heart_only_mae_hu', 'heart_only',
           'mae_hu of the test slices drawn from the heart masks alone', headline=True),
    Metric('heart_only_mse', 'heart_only',
           'mse of the test slices drawn from the heart masks alone'),
    Metric('heart_only_psnr', 'heart_only',
           'psnr of the test slices drawn from the heart masks alone'),
    Metric('heart_only_dice_generated_mean', 'heart_only',
           'dice_generated_mean of the test slices drawn from the heart masks alone', headline=True),
    Metric('heart_only_c2st_auc', 'heart_only',
           'c2st_auc of the test slices drawn from the heart masks alone (classifiers trained on the validation '
           'patients\' heart-only slices)', headline=True),
    Metric('heart_only_c2st_p', 'heart_only',
           'c2st_p of heart_only_c2st_auc'),
    Metric('texture_std_ratio', 'realism',
           'texture: standard deviation of the high-pass residual (slice − Gaussian blur, σ 1 px) inside '
           'homogeneous regions of the real slice (each structure, lung, other soft tissue; eroded 1 px), the '
           'same pixels of the generated slice, generated / real (1 = as real; > 1 a pattern of its own, < 1 '
           'too smooth)',
           label='Texture: residual std (generated / real)', better='≈ 1'),
    Metric('texture_std_ratio_<S>', 'realism',
           'texture_std_ratio inside structure <S>'),
    Metric('texture_std_ratio_lung', 'realism',
           'texture_std_ratio inside the lung (body pixels below -400 HU outside every structure)'),
    Metric('texture_std_ratio_soft_tissue', 'realism',
           'texture_std_ratio inside other soft tissue (body pixels within [-150, 250] HU outside every '
           'structure)'),
    Metric('texture_residual_std_real_hu', 'realism',
           "standard deviation in HU of the real slices' high-pass residual in the texture regions (the scale of "
           'texture_std_ratio)'),
    Metric('texture_nps_ratio_band1', 'realism',
           'noise power spectrum of the high-pass residual in the texture regions (|FFT(residual · region)|² / '
           'region pixels, radially averaged), generated / real, frequencies (0, 0.125] cycles/px'),
    Metric('texture_nps_ratio_band2', 'realism',
           'the same spectrum ratio at (0.125, 0.25] cycles/px'),
    Metric('texture_nps_ratio_band3', 'realism',
           'the same spectrum ratio at (0.25, 0.375] cycles/px'),
    Metric('texture_nps_ratio_band4', 'realism',
           'the same spectrum ratio at (0.375, 0.5] cycles/px (the finest texture)'),
    Metric('contrast_bias_hu_<S>', 'realism',
           'contrast: mean over test patients of (generated − real) mean HU inside structure <S> (> 0: drawn too '
           'bright); interval: t over patients'),
    Metric('contrast_bias_hu_max_abs', 'realism',
           'largest |contrast_bias_hu_<S>| over the structures'),
    Metric('contrast_spread_ratio_<S>', 'realism',
           "between-patient spread of structure <S>'s mean HU: sd over test patients of the generated means / sd "
           'of the real means (1 = each patient keeps their own contrast level; 0 = every patient drawn alike)'),
    Metric('contrast_spread_ratio', 'realism',
           'between-patient contrast spread over all structures: sqrt(Σ_S var_generated / Σ_S var_real) of the '
           "patients' mean HU per structure",
           label='Contrast spread between patients (generated / real)', better='≈ 1'),
    Metric('privacy_n_shareable', 'privacy',
           'number of generated slices whose in-body SSIM to the nearest training slice is at or below the '
           'threshold (listed in reports/shareable.json)'),
)
_BY_KEY = {m.key: m for m in METRICS}


def lookup(key: str) -> Metric | None:
    """The declaration of a metrics.json key (structure keys resolve their ``<S>`` template)."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    for template, spec in _BY_KEY.items():
        if "<S>" in template:
            prefix, suffix = template.split("<S>")
            name = key[len(prefix):len(key) - len(suffix)] if key.endswith(suffix) else ""
            if key.startswith(prefix) and name in STRUCTURES:
                return spec
    return None


def definition(key: str) -> str:
    """One-line definition of a metrics.json key ('' for an undeclared key)."""
    spec = lookup(key)
    if spec is None:
        return ""
    if "<S>" not in spec.key:
        return spec.definition
    prefix, suffix = spec.key.split("<S>")
    return spec.definition.replace("<S>", key[len(prefix):len(key) - len(suffix)])


def table_rows() -> list[Metric]:
    """The report's headline table, in order."""
    return [m for m in METRICS if m.label]


def short(reason: str, limit: int = 110) -> str:
    return reason if len(reason) <= limit else reason[:limit].rsplit(" ", 1)[0] + " …"


def docs_markdown() -> str:
    """docs/metrics.md, generated from :data:`METRICS`."""
    out = ["# Metrics", "",
           "Generated from `src/ctsynth/evaluate/registry.py` by "
           "`python -m ctsynth.evaluate.registry > docs/metrics.md`; do not edit by hand.", "",
           f"`<S>` is a structure ({', '.join(STRUCTURES)}). **Headline** metrics are in "
           "`reports/headline.json` (what `dvc exp show` shows) and in the first section of the MLflow "
           "run page (`Headline/<key>`); every metric is in `reports/metrics.json`, its 95 % patient-level "
           f"interval (where it has one) in `reports/metrics_ci.json` as `<key>{SUFFIX}`; in MLflow every "
           "other metric is `<group>/<key>`, and both files are artifacts of the run (`metrics/`).", ""]
    for group, what in GROUPS.items():
        out += [f"## {group}: {what}", "", "| key | headline | definition |", "|---|---|---|"]
        out += [f"| `{m.key}` | {'yes' if m.headline else ''} | {m.definition.replace('|', '/')} |"
                for m in METRICS if m.group == group]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":                     # python -m ctsynth.evaluate.registry > docs/metrics.md
    print(docs_markdown(), end="")
