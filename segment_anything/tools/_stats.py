"""Means with bootstrap confidence intervals, resampling images (objects of one image are not
independent: they share the image, its lighting and its embedding)."""

from typing import Dict, Sequence

import numpy as np


def bootstrap_mean(values: Sequence[float], groups: Sequence[str], n_resamples: int = 2000,
                   seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Mean of ``values`` (one per object) and its percentile bootstrap interval.

    Each resample draws as many groups (images) as there are, with replacement, and averages
    every object of the drawn groups. Returns {"mean", "ci_low", "ci_high", "n", "images"}: n
    objects in that many images; NaN values (a metric that does not apply to an object) are left
    out. Over fewer than two images every resample is the same and the "interval" would be a
    point, so there is none: ci_low and ci_high are None."""
    values = np.asarray(values, np.float64)
    groups = np.asarray(groups)
    keep = ~np.isnan(values)
    values, groups = values[keep], groups[keep]
    if values.size == 0:
        return {"mean": float("nan"), "ci_low": None, "ci_high": None, "n": 0, "images": 0}
    names, index = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        return {"mean": float(values.mean()), "ci_low": None, "ci_high": None, "n": int(values.size), "images": 1}
    sums = np.bincount(index, weights=values, minlength=len(names))
    counts = np.bincount(index, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(n_resamples, len(names)))
    # Per resample: each group's weight is how often it was drawn.
    weights = np.stack([np.bincount(d, minlength=len(names)) for d in draws]).astype(np.float64)
    means = (weights @ sums) / (weights @ counts)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(values.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(values.size),
            "images": len(names)}


def format_ci(stat: Dict[str, float], signed: bool = False) -> str:
    """'0.812 [0.790, 0.833]' (with a sign for differences); '0.812 (no interval)' over one image."""
    if stat["n"] == 0:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    if stat["ci_low"] is None:
        return f"{f.format(stat['mean'])} (no interval)"
    return f"{f.format(stat['mean'])} [{f.format(stat['ci_low'])}, {f.format(stat['ci_high'])}]"
