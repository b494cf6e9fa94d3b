"""Writing the report folder: report.md, the CSV tables and the PNG figures, from the sections."""
from __future__ import annotations

from cluster.report import stats
from cluster.report.comparisons import analyse
from cluster.report.figures import use_headless_backend
from cluster.report.sections import SECTIONS, ReportFiles
from mtl import storage


def write_report(root: str, out: str | None = None, resamples: int = stats.RESAMPLES,
                 per_task_best: bool = False) -> str:
    """Write the report folder (default: <root>/report); returns its URL."""
    use_headless_backend()
    out = out or storage.join(root, "report")
    analysis = analyse(root, resamples, per_task_best)
    files = ReportFiles()
    for section in SECTIONS:
        section(analysis, files)
    for name, image in files.figures.items():
        storage.write_bytes(storage.join(out, name), image)
    for name, rows in files.tables.items():
        if rows:
            storage.write_csv(storage.join(out, f"{name}.csv"), rows)
    storage.write_text(storage.join(out, "report.md"), "\n".join(files.md) + "\n")
    return out
