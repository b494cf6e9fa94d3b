"""How the report writes a number: a % change, a mean ± std over seeds, a change with its interval,
and the marks of a change whose baseline saw another (or an unknown) number of examples."""
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
