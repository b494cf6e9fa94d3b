"""How the report writes a number: a % change, a mean ± std over seeds, a change with its interval,
the marks of a change whose baseline saw another (or an unknown) number of examples, and a
method's cost against addition's."""
from __future__ import annotations

from cluster.report.stats import Summary, mean_std

NOT_SIZED, SIZE_UNKNOWN = "†", "‡"      # marks of a change whose baseline saw another (or an unknown) amount


def pct(value: float) -> str:
    return f"{value:+.1f}%"


def count_text(value) -> str:
    return "an unknown number of" if value is None else f"{value:,}"


def marks_in_use(summaries: dict) -> set[str]:
    """Which size marks the report uses: † always where a baseline saw another number of examples;
    ‡ (size unknown) only when some changes are known to be size-matched, since a study that
    recorded no sizes at all is said to be so once, not in every cell."""
    sizes = {s.size for s in summaries.values()}
    return {"unequal"} | ({"unknown"} if sizes - {"unknown"} else set())


def size_mark(size: str, in_use: set[str]) -> str:
    if size not in in_use:
        return ""
    return NOT_SIZED if size == "unequal" else SIZE_UNKNOWN if size == "unknown" else ""


def seed_cell(seeds: dict[int, float], digits: int, signed: bool = False) -> str:
    if not seeds:
        return ""
    mean, std = mean_std(seeds.values())
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if len(seeds) > 1 else "")


def change_text(s: Summary, marks: set[str], parens: bool = True) -> str:
    """'(+10.3% [+2.1, +18.0])† *': change over seeds, its interval, size mark, significance."""
    interval = f" [{s.lo:+.1f}, {s.hi:+.1f}]" if s.lo is not None else ""
    body = f"{seed_cell(s.values, 1, signed=True)}%{interval}"
    return (f"({body})" if parens else body) + size_mark(s.size, marks) + (" *" if s.significant else "")


COST_HEAD = "cost vs addition"


def cost_text(cost) -> str:
    """'×2.31 time, ×1.40 memory' against addition (a ``comparisons.Cost``); '0.412 s/step, 1,380 MB'
    where no addition run matches; 'n/a' where the trials did not record their cost."""
    if cost is None or (cost.step_s is None and cost.peak_mb is None):
        return "n/a"
    if cost.step_ratio is not None or cost.memory_ratio is not None:
        def ratio(value):
            return "n/a" if value is None else f"×{value:.2f}"
        return f"{ratio(cost.step_ratio)} time, {ratio(cost.memory_ratio)} memory"
    step = "n/a" if cost.step_s is None else f"{cost.step_s:.3g} s/step"
    return f"{step}, " + ("n/a" if cost.peak_mb is None else f"{cost.peak_mb:,.0f} MB")


def cost_note(memory_kinds: set[str]) -> str:
    """The protocol's sentence on the cost columns, for the kinds of peak memory the trials recorded."""
    note = (f"Cost: the \"{COST_HEAD}\" columns give a method's mean step time and peak memory against addition's "
            "on the same tasks and settings (workers, batch, accumulation, strategy, kind of device; ×1.00: "
            "addition), seconds per step and MB where no addition run matches, n/a where the trials did not record "
            "them (results written before trials recorded their cost).")
    if "cpu_rss" in memory_kinds:
        note += (" On CPU the peak is the process's resident set, interpreter and libraries included, so its ratios "
                 "understate a method's own memory.")
    if "cuda_allocated" in memory_kinds:
        note += " On a GPU it is the peak allocated to tensors while training (the CUDA context not counted)."
    return note
