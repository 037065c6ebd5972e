"""The report's figures (matplotlib, Agg backend): loss and D-accuracy curves, the privacy
histogram, and test slices generated from each condition subset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data import ProcessedStore
from .errors import InputError
from .labels import WH
from .split import load_split


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
    for col, label in (("g_adv", "G adversarial"), ("d_real", "D real"), ("d_fake", "D fake")):
        if col in losses:
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
    ax.axvline(threshold, color="red", ls="--", lw=1.2, label=f"max_similarity = {threshold:g}")
    ax.set(title="similarity to the nearest training slice", xlabel="similarity", ylabel="slices")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fig_condition_subsets(model_path, processed_dir, split_path, out_png,
                          n_slices: int = 2) -> list[list[str]]:
    """PNG: a few test slices generated from the full condition set and from each single structure.

    Rows = condition subset (first row: the real slice), columns = mask | image per slice; the
    richest slice of each of the first ``n_slices`` test cases. Single structures absent from
    those slices are left out. Returns the subsets drawn."""
    from .generate import Synthesizer, kept_indices, load_model, mask_rgb

    plt = _plt()
    store = ProcessedStore(processed_dir)
    test = load_split(split_path).get("test", [])
    rows = store.rows_for_cases(test)
    if not len(rows):
        raise InputError(f"{split_path}: no test slices in {processed_dir}")
    cases = store.slices.case.to_numpy()[rows]
    picks = []                                        # the richest slice of each of the first cases
    for case in list(dict.fromkeys(cases))[: max(1, n_slices)]:
        own = rows[cases == case]
        picks.append(own[np.argmax([len(np.unique(store.masks[r])) for r in own])])
    picks = np.array(picks)
    model, meta = load_model(model_path)
    full = list(meta["structures"])
    masks = np.asarray(store.masks[picks])                                          # (K, S, S)
    present = [s for s in full if s != WH and np.isin(masks, kept_indices([s])).any()]
    subsets = [full] + ([[s] for s in present] if len(full) > 1 else [])
    fig, axes = plt.subplots(len(subsets) + 1, 2 * len(picks), squeeze=False,
                             figsize=(2.0 * 2 * len(picks), 2.0 * (len(subsets) + 1)))
    grid = [("real", masks, np.asarray(store.images[picks], np.float32))]
    for subset in subsets:
        synth = Synthesizer(model, meta, batch_size=len(picks), structures=subset)
        kept = np.where(np.isin(masks, synth.keep), masks, 0)
        grid.append(("+".join(subset) if subset != full else f"all ({len(full)})", kept, synth.unit(masks)))
    for r, (name, m, images) in enumerate(grid):
        for k in range(len(picks)):
            axes[r, 2 * k].imshow(mask_rgb(m[k]), interpolation="nearest")
            axes[r, 2 * k + 1].imshow(images[k], cmap="gray", vmin=-1, vmax=1)
        axes[r, 0].set_ylabel(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    for k, row in enumerate(picks):
        case, z = store.slices.case.iloc[row], store.slices.z.iloc[row]
        axes[0, 2 * k].set_title(f"{case} z={z}: mask", fontsize=9)
        axes[0, 2 * k + 1].set_title("real / generated", fontsize=9)
    _save(fig, out_png, dpi=70)
    return subsets
