"""The study's answer: which tasks to train together and how to combine their losses.

    python launch/report.py runs/sweep                 # writes runs/sweep/report/
    python launch/report.py s3://bucket/study --out /tmp/report

Reads every trial of a sweep (its own results.json and best/dev_predictions.json, on any fsspec
URL) and writes ``report.md``, PNG figures and the numbers as CSV:

- a protocol paragraph: the examples of each task every trial saw per epoch (size control), the
  test behind the significance marks and why, and how large a change the dev set's size alone
  produces;
- absolute dev scores per task, by grouping and loss combination, the single-task baselines on top;
- each score's change (%) against the single-task baseline of the same task, settings, seed and
  examples per epoch, with a paired-bootstrap 95% interval over dev examples, as a table and heatmap;
- Δm% (the mean of a multi-task model's per-task changes) per pairing, and the methods ranked by it
  over the pairings they all share;
- each method's cost beside its score (score tables, ranking, Pareto fronts): mean step time and peak
  memory against addition's on the same tasks and settings, from the trials' own records;
- for each pair, the α sweep as a Pareto view (change of one task against the other's);
- for unitary scalarization, each task's change against its own weight with a fitted quadratic;
- significance: with several seeds a paired t-test across seeds, with one seed the bootstrap;
  Holm-corrected over the report's comparisons;
- each pairing's gradient conflict (mean cosine, conflict fraction) beside its change;
- answers: best partner and combiner per task (on common pairings), pairs that help both ways,
  how much weighting matters; confusion matrices / a scatter for the best model of each task;
- which trials are missing, failed or unreadable (a broken results.json never stops the report).

Scores are each task's primary dev metric (SEN accuracy, PAR accuracy, SIM Pearson), as in the
reference study.  The package reads a study's files and imports no backend; its modules, in the
order the report is made:

- ``reading``: the study's trials (``load_study``, ``Trial``) and their dev predictions;
- ``stats``: the statistics, as pure functions of numbers (bootstrap, tests, Holm, Pareto, fits);
- ``comparisons``: changes against matched baselines, their bootstrap, summaries over seeds, Δm%,
  Pareto views, α curves, conflict, costs against addition; ``analyse`` computes them once into an
  ``Analysis``;
- ``formatting``: how a number, a change, its size marks and a cost are written;
- ``protocol`` and ``answers``: the protocol paragraph and the answers, as sentences;
- ``figures``: the PNG figures (matplotlib, imported on first use);
- ``sections``: the report's sections in order (``SECTIONS``), each writing Markdown, CSV rows, figures;
- ``writing``: ``write_report``, which runs the sections and writes the folder;
- ``cli``: ``main``, the command line.
"""
from cluster.report.cli import main
from cluster.report.comparisons import Analysis, Change, analyse, match_baselines
from cluster.report.reading import Study, Trial, load_study
from cluster.report.stats import Summary, compare_on_common, fit_quadratic, mean_std, summarise
from cluster.report.writing import write_report
# Checked on its own by tests/unit/test_report.py (the sentence when combiners share no pairing).
from cluster.report.answers import _best_combiner_text

__all__ = ["Analysis", "Change", "Study", "Summary", "Trial", "analyse", "compare_on_common", "fit_quadratic",
           "load_study", "main", "match_baselines", "mean_std", "summarise", "write_report", "_best_combiner_text"]
