"""Every figure the pipeline renders (matplotlib with the Agg backend, or PIL): loss and
D-accuracy curves, the privacy histogram, the condition-subset grid, the per-case test grids
(mask | real | generated | |difference|). Rendering only: the images come in as arrays.

The training's evolution snapshots are drawn in :mod:`ctsynth.train.snapshots` on purpose: they are an
output of the train stage, whose code deps are its import closure, so drawing them here would
retrain the GAN whenever a report figure changes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ctsynth.core.labels import STRUCTURE_COLOURS, STRUCTURES, structure_index


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, dpi: int = 90) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def fig_losses(losses: pd.DataFrame, path: Path) -> Path:
    """Paper Fig. 2: generator and discriminator losses over generator steps."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for col, label in (("g_adv", "G adversarial"), ("d_real", "D real"), ("d_fake", "D fake"),
                       ("g_fm", "G feature matching (unweighted)"), ("g_spec", "G spectral (unweighted)")):
        if col in losses and (col not in ("g_fm", "g_spec") or losses[col].any()):   # only when their λ > 0
            a.plot(losses.step, losses[col], label=label, lw=1)
    a.set(title="adversarial losses (least squares)", xlabel="generator step", ylabel="loss")
    a.legend(fontsize=8)
    if "g_l1" in losses:
        b.plot(losses.step, losses.g_l1, color="C3", lw=1)
    b.set(title="generator L1 (model space)", xlabel="generator step", ylabel="L1")
    a.grid(alpha=.3), b.grid(alpha=.3)
    return _save(fig, path)


def fig_d_accuracy(losses: pd.DataFrame, path: Path) -> Path:
    """Paper Fig. 3: discriminator patch accuracy on real and fake images."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for col, label in (("d_acc_real", "D accuracy on real"), ("d_acc_fake", "D accuracy on fake")):
        if col in losses:
            ax.plot(losses.step, losses[col], label=label, lw=1)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set(title="discriminator accuracy (threshold 0.5 per patch)", xlabel="generator step",
           ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    return _save(fig, path)


def fig_privacy(generated: np.ndarray, real: np.ndarray | None, threshold: float, path: Path) -> Path:
    """Histogram of nearest-training-slice similarity: generated vs real test slices."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    values = [generated] + ([real] if real is not None and len(real) else [])
    lo = min(float(np.min(v)) for v in values)
    bins = np.linspace(min(lo, threshold) - 0.01, 1.0, 40)
    ax.hist(generated, bins=bins, alpha=.6, label=f"generated (n={len(generated)})", color="C1")
    if real is not None and len(real):
        ax.hist(real, bins=bins, alpha=.5, label=f"real test (n={len(real)})", color="C0")
    ax.axvline(threshold, color="red", ls="--", lw=1.2, label=f"threshold = {threshold:.3f}")
    ax.set(title="similarity to the nearest training slice", xlabel="similarity", ylabel="slices")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fig_condition_subsets(panels, titles, out_png) -> Path:
    """PNG of :func:`ctsynth.synth.generate.condition_subset_panels`: rows = condition subset (first
    row: the real slice), columns = mask | image per slice."""
    plt = _plt()
    k_slices = len(titles)
    fig, axes = plt.subplots(len(panels), 2 * k_slices, squeeze=False,
                             figsize=(2.0 * 2 * k_slices, 2.0 * len(panels)))
    for r, (name, m, images) in enumerate(panels):
        for k in range(k_slices):
            axes[r, 2 * k].imshow(mask_rgb(m[k]), interpolation="nearest")
            axes[r, 2 * k + 1].imshow(images[k], cmap="gray", vmin=-1, vmax=1)
        axes[r, 0].set_ylabel(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    for k, (case, z) in enumerate(titles):
        axes[0, 2 * k].set_title(f"{case} z={z}: mask", fontsize=9)
        axes[0, 2 * k + 1].set_title("real / generated", fontsize=9)
    return _save(fig, out_png, dpi=70)


# ------------------------------------------------------------------------------ test-case grids

# Background black, then Myo, LA, LV, RA, RV, Ao, PA: the colour-blind-safe Okabe-Ito palette,
# the same colours as the training snapshots (ctsynth.train.snapshots).
STRUCTURE_RGB = STRUCTURE_COLOURS.astype(np.float32) / 255.0      # (8, 3) in [0, 1]


def mask_rgb(mask: np.ndarray) -> np.ndarray:
    """Structure-index mask (H, W) -> RGB (H, W, 3) float in [0, 1]."""
    return STRUCTURE_RGB[np.clip(mask, 0, len(STRUCTURES))]


def legend_handles(present) -> list:
    from matplotlib.patches import Patch

    return [Patch(color=STRUCTURE_RGB[structure_index(s)], label=s) for s in STRUCTURES
            if structure_index(s) in set(int(v) for v in present)]


def save_case_grid(path: Path, case: str, masks, reals, fakes, zs, *, window, unit: str = "HU") -> None:
    """Rows = slices; columns mask (colour) | real | generated | |difference| (window display, in ``unit``).

    masks (R, S, S) uint8; reals, fakes (R, S, S) in [-1, 1]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = window
    diff_max = 0.25 * (hi - lo)
    n = len(zs)
    fig, axes = plt.subplots(n, 4, figsize=(8.4, 2.1 * n + 0.7), squeeze=False)
    titles = ["mask", f"real  [{lo:g}, {hi:g}] {unit}", "generated", f"|difference|  0–{diff_max:g} {unit}"]
    for r in range(n):
        diff = np.abs(fakes[r].astype(np.float32) - reals[r].astype(np.float32)) * 0.5 * (hi - lo)
        panels = [(mask_rgb(masks[r]), {}), (reals[r], dict(cmap="gray", vmin=-1, vmax=1)),
                  (fakes[r], dict(cmap="gray", vmin=-1, vmax=1)),
                  (diff, dict(cmap="magma", vmin=0, vmax=diff_max))]
        for c, (img, kw) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.asarray(img, np.float32), interpolation="nearest", **kw)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(f"z = {zs[r]}", fontsize=10)
    handles = legend_handles(np.unique(masks))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"test case {case}", fontsize=11)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_orthogonal_views(path: Path, case: str, real, fake, centre, dz: float, *, dxy: float, window,
                          unit: str = "HU") -> Path:
    """Rows coronal | sagittal through ``centre`` = (z, row, col) of a (Z, S, S) volume; columns
    real | generated | |difference| in HU. Pixels drawn at their physical aspect (dz : dxy),
    superior up."""
    plt = _plt()
    lo, hi = (float(v) for v in window)
    diff_max = 0.25 * (hi - lo)
    _, r, c = centre
    views = [("coronal", real[:, r, :], fake[:, r, :]), ("sagittal", real[:, :, c], fake[:, :, c])]
    fig, axes = plt.subplots(2, 3, figsize=(8.4, 1.2 + 2 * 2.8 * max(0.35, real.shape[0] * dz / (real.shape[1] * dxy))),
                             squeeze=False)
    titles = ["real", "generated", f"|difference|  0–{diff_max:g} {unit}"]
    for i, (name, a, b) in enumerate(views):
        diff = np.abs(b.astype(np.float32) - a.astype(np.float32)) * 0.5 * (hi - lo)
        for j, (img, kw) in enumerate([(a, dict(cmap="gray", vmin=-1, vmax=1)), (b, dict(cmap="gray", vmin=-1, vmax=1)),
                                       (diff, dict(cmap="magma", vmin=0, vmax=diff_max))]):
            ax = axes[i, j]
            ax.imshow(np.asarray(img, np.float32), origin="lower", aspect=dz / dxy, interpolation="nearest", **kw)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
        axes[i, 0].set_ylabel(f"{name}\n{'row' if name == 'coronal' else 'col'} {r if name == 'coronal' else c}",
                              fontsize=9)
    fig.suptitle(f"test case {case}: through the heart, superior up", fontsize=10)
    return _save(fig, path, dpi=80)


def fig_utility(frame: pd.DataFrame, path: Path) -> Path:
    """Downstream Dice on real test slices per structure (and their mean) for each training set,
    bars with their 95 % intervals. frame: model, structure, dice, lo, hi (``reports/utility.csv``).
    A structure absent from the test ground truth (Dice blank for every model) gets no bars and
    the tick label '<S> (absent)'."""
    plt = _plt()
    models = list(dict.fromkeys(frame.model))
    structures = [s for s in dict.fromkeys(frame.structure) if s != "mean"] + ["mean"]
    scored = set(frame.structure[np.isfinite(frame.dice.to_numpy(float))])
    labels = {"real": "real only", "synthetic": "synthetic only", "mixed": "real + synthetic"}
    fig, ax = plt.subplots(figsize=(8.4, 3.4))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        rows = frame[frame.model == model].set_index("structure").reindex(structures)
        x = np.arange(len(structures)) + (i - (len(models) - 1) / 2) * width
        d = rows.dice.to_numpy(float)
        err = np.vstack([d - rows.lo.to_numpy(float), rows.hi.to_numpy(float) - d])
        ax.bar(x, d, width, label=labels.get(model, model), color=f"C{i}",
               yerr=np.where(np.isfinite(err), np.clip(err, 0, None), 0), capsize=2, error_kw={"lw": .8})
    values = np.r_[frame.dice.to_numpy(float), frame.lo.to_numpy(float)]
    lowest = values[np.isfinite(values)].min(initial=1.0)
    ax.set_xticks(np.arange(len(structures)), [s if s in scored else f"{s}\n(absent)" for s in structures])
    ax.set(ylabel="Dice on real test slices", ylim=(max(0.0, np.floor(10 * lowest - 0.5) / 10), 1.0),
           title="segmenter trained on … (bars: 95 % patient-level intervals)")
    ax.legend(fontsize=8, ncol=len(models), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.grid(axis="y", alpha=.3)
    return _save(fig, path)


def save_synthetic_case(path: Path, case: str, image, labels, centre, spacing, *, window, unit: str = "HU") -> Path:
    """A synthetic case in three orthogonal views through ``centre`` (x, y, z voxel): rows axial |
    coronal | sagittal, columns mask | CT. ``image`` HU and ``labels`` structure indices, both
    canonical RAS (X, Y, Z); drawn at the physical aspect, anterior / superior up."""
    plt = _plt()
    x, y, z = (int(v) for v in centre)
    sx, sy, sz = (float(v) for v in spacing)
    views = [("axial", lambda v: v[:, :, z].T, sy / sx, f"z {z}"),          # rows y (posterior→anterior)
             ("coronal", lambda v: v[:, y, :].T, sz / sx, f"y {y}"),        # rows z (inferior→superior)
             ("sagittal", lambda v: v[x, :, :].T, sz / sy, f"x {x}")]
    heights = [image.shape[1] * sy, image.shape[2] * sz, image.shape[2] * sz]        # mm, per row
    width_mm = max(image.shape[0] * sx, image.shape[1] * sy)
    fig, axes = plt.subplots(3, 2, figsize=(6.4, 1.2 + 3.0 * sum(heights) / width_mm), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    lo, hi = (float(v) for v in window)
    for i, (name, cut, aspect, where) in enumerate(views):
        axes[i, 0].imshow(mask_rgb(cut(labels)), origin="lower", aspect=aspect, interpolation="nearest")
        axes[i, 1].imshow(cut(image), origin="lower", aspect=aspect, cmap="gray", vmin=lo, vmax=hi,
                          interpolation="nearest")
        axes[i, 0].set_ylabel(f"{name}\n{where}", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_title("synthetic mask", fontsize=9)
    axes[0, 1].set_title(f"synthetic {'MR' if unit == 'nu' else 'CT'} ({lo:g} to {hi:g} {unit})", fontsize=9)
    present = sorted(int(v) for v in np.unique(labels) if v)
    fig.legend(handles=legend_handles(present), loc="lower center", ncol=min(7, len(present)), fontsize=8,
               frameon=False)
    fig.suptitle(f"synthetic case {case}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
