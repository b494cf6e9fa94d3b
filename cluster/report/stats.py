"""The statistics of the study report, as pure functions of numbers (no files, no trials):

- ``relative_change`` and ``delta_m``: the % change of a score against its baseline, and Δm%, the
  mean of a multi-task model's per-task relative changes (Maninis et al. 2019; Vandenhende et al.
  2021, as LibMTL reports it; every metric here is higher-is-better, so no sign flips);
- ``ttest_p``: the paired t-test across seeds of a set of per-seed changes;
- ``holm``: Holm's step-down correction of a family of p-values;
- ``bootstrap_scores`` / ``percentile_interval`` / ``bootstrap_p``: a paired bootstrap over dev
  examples (every model of a dev set scored under the same resampled rows);
- ``align_rows`` / ``paired_changes``: two models' dev predictions matched by row id, and the
  resampled % changes of many such comparisons at once;
- ``Summary`` / ``summarise`` / ``correct``: a change over seeds, its interval and test;
- ``compare_on_common``: methods ranked on the pairings they all share;
- ``pareto_front``: the settings not dominated in two changes;
- ``fit_quadratic``: change against a task's own loss weight.
"""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
RESAMPLES = 2000            # bootstrap resamples: the percentiles of a 95% interval move < 0.1 point beyond this
BOOTSTRAP_SEED = 2024       # fixed, so the same study gives the same report
LEVEL = 0.95


# --------------------------------------------------------------------------------------------
# Changes
# --------------------------------------------------------------------------------------------
def relative_change(score: float, base: float) -> float | None:
    """% change of ``score`` against ``base`` (None when the baseline is 0: no relative scale)."""
    return 100.0 * (score - base) / abs(base) if base else None


def delta_m(changes) -> float | None:
    """Δm%: the mean of the tasks' % changes (None if any task has none)."""
    values = list(changes)
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def mean_std(values) -> tuple[float, float]:
    v = list(values)
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, std


# --------------------------------------------------------------------------------------------
# Tests and their correction
# --------------------------------------------------------------------------------------------
def ttest_p(values) -> float | None:
    """Two-sided one-sample t-test of per-seed changes against 0 (the paired test: each seed's
    multi-task run against the same seed's baseline).  None below 2 seeds."""
    from scipy import stats          # lazily: seconds to import, needed only with several seeds

    values = list(values)
    if len(values) < 2:
        return None
    if max(values) == min(values):
        return 0.0 if values[0] != 0 else 1.0       # no spread: t is infinite (or undefined)
    return float(stats.ttest_1samp(values, 0.0).pvalue)


def holm(pvalues: dict) -> dict:
    """key -> Holm-adjusted p (step-down: the i-th smallest p times (m - i), made monotone and
    capped at 1).  Keys whose p is None are left out."""
    ranked = sorted((k for k, p in pvalues.items() if p is not None), key=lambda k: pvalues[k])
    m, running, out = len(ranked), 0.0, {}
    for i, key in enumerate(ranked):
        running = max(running, min(1.0, pvalues[key] * (m - i)))
        out[key] = running
    return out


# --------------------------------------------------------------------------------------------
# Paired bootstrap over dev examples
# --------------------------------------------------------------------------------------------
def resample_seed(*parts: str) -> list[int]:
    """A generator seed from the report's fixed seed and names (a task, the dev rows' ids): every
    comparison on the same dev rows gets the same resamples, whatever order the trials come in,
    so seeds' resampled changes can be averaged resample by resample."""
    return [BOOTSTRAP_SEED] + [zlib.crc32(p.encode()) for p in parts]


def _resample_counts(n: int, resamples: int, rng: np.random.Generator, chunk_cells: int = 4_000_000):
    """Yield (chunk, n) matrices: how often each row is drawn in each resample (n draws with
    replacement).  Chunked so that a 20,000-row dev set never holds 2000 x 20,000 cells at once."""
    chunk = max(1, min(resamples, chunk_cells // max(n, 1)))
    done = 0
    while done < resamples:
        k = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(k, n)) + (np.arange(k) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)
        done += k


def bootstrap_scores(metric: str, gold, preds, resamples: int = RESAMPLES, seed=None) -> np.ndarray:
    """Each model's score under each resample of the dev rows: an array (resamples, models).

    ``preds`` is (models, rows), every model's predictions on the same rows as ``gold``; a resample
    draws row indices once and applies them to every model (the paired bootstrap: differences
    between models see only the rows where they differ).  ``metric`` is "acc" (share of
    predictions equal to gold) or "pearson".  Scores are computed from the resample counts as
    weighted sums, one matrix product per chunk, for all models at once."""
    gold = np.asarray(gold, dtype=np.float64)
    preds = np.atleast_2d(np.asarray(preds, dtype=np.float64))
    n = gold.shape[0]
    rng = np.random.default_rng(seed)
    out = []
    if metric == "acc":
        correct = (preds == gold[None, :]).astype(np.float64).T            # (rows, models)
        for counts in _resample_counts(n, resamples, rng):
            out.append(counts @ correct / n)
    elif metric == "pearson":
        # Centre on the full-sample means first: the weighted moments then lose no precision to
        # cancellation (Pearson's r does not change under a shift).
        x = (preds - preds.mean(axis=1, keepdims=True)).T                   # (rows, models)
        g = gold - gold.mean()
        for counts in _resample_counts(n, resamples, rng):
            mx, mg = counts @ x / n, counts @ g / n                        # (chunk, models), (chunk,)
            sxx = counts @ (x * x) / n - mx ** 2
            sgg = counts @ (g * g) / n - mg ** 2
            sxg = counts @ (x * g[:, None]) / n - mx * mg[:, None]
            denom = np.sqrt(np.clip(sxx, 0, None) * np.clip(sgg, 0, None)[:, None])
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append(np.where(denom > 0, sxg / np.where(denom > 0, denom, 1.0), 0.0))
    else:
        raise ValueError(f"no bootstrap for metric {metric!r}")
    return np.concatenate(out, axis=0)


def score(metric: str, gold, pred) -> float:
    """The metric on all rows, as ``bootstrap_scores`` computes it (the report checks it against
    the recorded score before trusting a prediction file)."""
    gold, pred = np.asarray(gold, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if metric == "acc":
        return float((pred == gold).mean())
    x, g = pred - pred.mean(), gold - gold.mean()
    denom = math.sqrt(float(x @ x) * float(g @ g))
    return float(x @ g) / denom if denom > 0 else 0.0


def relative_change_samples(trial: np.ndarray, base: np.ndarray) -> np.ndarray:
    """% change per resample (NaN where a resampled baseline is 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base != 0, 100.0 * (trial - base) / np.abs(np.where(base != 0, base, 1.0)), np.nan)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval: the (1-level)/2 and (1+level)/2 quantiles of the resampled values."""
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_p(observed: float, samples: np.ndarray) -> float:
    """Two-sided p of H0 'no change' from the bootstrap distribution: 2·Φ(-|observed| / se), se the
    resamples' standard deviation.

    Counting resamples on the far side of 0 gives the same number where it can resolve it, but it
    cannot go below 1/B (0.0005 at B = 2000), and Holm over the report's dozens of comparisons
    would then never let a change pass, however large; the normal tail has no such floor.  A
    change with no resampling spread (identical predictions) is p = 1 if it is 0, else 0."""
    s = samples[np.isfinite(samples)]
    se = float(s.std(ddof=1)) if s.size > 1 else 0.0
    if se == 0.0:
        return 1.0 if observed == 0 else 0.0
    return math.erfc(abs(observed) / se / math.sqrt(2.0))


def empirical_p(samples: np.ndarray) -> float:
    """The counting form of the two-sided bootstrap p (twice the smaller share of resamples at or
    beyond 0, with the +1 of a permutation-style estimate), kept in the CSV beside ``bootstrap_p``."""
    s = samples[np.isfinite(samples)]
    b = s.size
    if b == 0:
        return float("nan")
    below, above = int((s <= 0).sum()), int((s >= 0).sum())
    return min(1.0, 2.0 * (min(below, above) + 1) / (b + 1))


def align_rows(a: tuple, b: tuple):
    """Two models' predictions of one task on their common rows: ``a`` and ``b`` are (ids, pred,
    gold); returns (ids, a's pred, b's pred, gold) in b's order, or raises ValueError with the
    reason (too few common rows, repeated ids, gold labels that differ)."""
    (a_ids, a_pred, a_gold), (b_ids, b_pred, b_gold) = a, b
    if list(a_ids) == list(b_ids):
        ai = bi = slice(None)
        ids = tuple(b_ids)
    else:
        where = {i: k for k, i in enumerate(a_ids)}
        if len(where) != len(a_ids) or len(set(b_ids)) != len(b_ids):
            raise ValueError("the two prediction files repeat ids and are not in the same order")
        common = [(k, where[i]) for k, i in enumerate(b_ids) if i in where]
        if len(common) < 2:
            raise ValueError(f"the two prediction files share {len(common)} rows")
        bi, ai = np.array([k for k, _ in common]), np.array([j for _, j in common])
        ids = tuple(b_ids[k] for k in bi)
    if not np.allclose(a_gold[ai], b_gold[bi]):
        raise ValueError("the two prediction files disagree on the gold labels")
    return ids, a_pred[ai], b_pred[bi], b_gold[bi]


def paired_changes(comparisons: list[dict], resamples: int = RESAMPLES) -> list[np.ndarray]:
    """The % change of model a against model b under each resample, for many comparisons.

    Each comparison is {"stream", "metric", "ids", "gold", "a": (name, pred), "b": (name, pred)}
    (``align_rows`` gives ids, preds and gold).  Comparisons of one stream (a task) on the same
    rows draw the same resamples (seeded by the stream and the ids), so every model there is scored
    once, in one pass, and changes of different comparisons (a study's seeds) can be averaged
    resample by resample."""
    groups: dict = defaultdict(list)
    for i, c in enumerate(comparisons):
        groups[(c["stream"], c["metric"], c["ids"])].append(i)
    out: list = [None] * len(comparisons)
    for (stream, metric, ids), members in groups.items():
        columns: dict = {}
        vectors = []
        for i in members:
            for name, pred in (comparisons[i]["a"], comparisons[i]["b"]):
                if name not in columns:
                    columns[name] = len(vectors)
                    vectors.append(pred)
        scores = bootstrap_scores(metric, comparisons[members[0]]["gold"], np.stack(vectors), resamples,
                                  seed=resample_seed(stream, "\x1f".join(ids)))
        for i in members:
            a, b = columns[comparisons[i]["a"][0]], columns[comparisons[i]["b"][0]]
            out[i] = relative_change_samples(scores[:, a], scores[:, b])
    return out


# --------------------------------------------------------------------------------------------
# A change over seeds, and fair rankings
# --------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """A change (one task's, or Δm) of one method on one grouping, over its seeds."""
    key: tuple
    values: dict                 # seed -> % change
    samples: dict                # seed -> bootstrap samples (None where there are none)
    size: str = "equal"          # how its runs' training sizes matched their baselines (report's marks)
    mean: float = 0.0
    std: float = 0.0
    lo: float | None = None
    hi: float | None = None
    test: str = ""               # "t-test" across seeds, "bootstrap", or "" (no test)
    p: float | None = None
    p_holm: float | None = None
    significant: bool | None = None


def summarise(values: dict, samples: dict, size: str = "equal", key=()) -> Summary:
    """Mean ± std over seeds; an interval when every seed has bootstrap samples (the seeds' changes
    averaged resample by resample: the dev-set noise of the seed mean); the test: the paired t-test
    across seeds from 2 seeds on (seed variance is the noise to beat), else the bootstrap's p."""
    s = Summary(key, dict(values), dict(samples), size)
    s.mean, s.std = mean_std(values.values())
    if values and all(samples.get(seed) is not None for seed in values):
        pooled = np.mean(np.stack([samples[seed] for seed in values]), axis=0)
        s.lo, s.hi = percentile_interval(pooled)
        if len(values) == 1:
            s.test, s.p = "bootstrap", bootstrap_p(s.mean, pooled)
    if len(values) >= 2:
        s.test, s.p = "t-test", ttest_p(values.values())
    return s


def correct(summaries: dict) -> None:
    """Holm over the family of summaries given, in place."""
    adjusted = holm({k: s.p for k, s in summaries.items()})
    for k, s in summaries.items():
        if k in adjusted:
            s.p_holm, s.significant = adjusted[k], adjusted[k] < ALPHA


def compare_on_common(values: dict, order=lambda name: name, pairing_order=lambda g: g) -> dict:
    """Rank methods fairly: ``values`` is method -> {pairing: value}.  Only the pairings every
    method was run on count (a method run on one favourable pairing must not outrank one that is
    better wherever both ran).  Returns the pairings, the common ones, the methods ranked by their
    mean there (best first; ties by ``order``; empty when no pairing is common) and, for each
    method that lacks some, the pairings it lacks."""
    methods = [m for m, v in values.items() if v]
    pairings = sorted({g for m in methods for g in values[m]}, key=pairing_order)
    common = [g for g in pairings if all(g in values[m] for m in methods)]
    ranked = sorted(((m, sum(values[m][g] for g in common) / len(common)) for m in methods),
                    key=lambda mv: (-mv[1], order(mv[0]))) if common else []
    lacking = {m: [g for g in pairings if g not in values[m]] for m in methods}
    return {"pairings": pairings, "common": common, "ranked": ranked,
            "lacking": {m: gs for m, gs in lacking.items() if gs}}


# --------------------------------------------------------------------------------------------
# Pareto front and the α curve
# --------------------------------------------------------------------------------------------
def pareto_front(points: dict) -> list:
    """Keys of the points (x, y) that no other point dominates (at least as good in both, better
    in one), ordered by x: the front of a two-objective trade-off, both objectives maximised.
    Equal points are both on the front (neither is better)."""
    items = list(points.items())
    front = [k for k, (x, y) in items
             if not any(qx >= x and qy >= y and (qx > x or qy > y) for _, (qx, qy) in items)]
    return sorted(front, key=lambda k: (points[k][0], -points[k][1]))


def fit_quadratic(points: list[tuple[float, float]]) -> dict:
    """Least-squares y = a w² + b w + c, its R², and the weight in [0, 1] that maximises it."""
    w = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    a, b, c = np.polyfit(w, y, 2)
    fitted = a * w ** 2 + b * w + c
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - fitted) ** 2).sum()) / total if total > 0 else 1.0
    candidates = [0.0, 1.0] + ([-b / (2 * a)] if a != 0 and 0.0 < -b / (2 * a) < 1.0 else [])
    best = max(candidates, key=lambda x: a * x * x + b * x + c)
    return {"coef": (float(a), float(b), float(c)), "r2": r2, "argmax": float(best),
            "max": float(a * best * best + b * best + c)}
