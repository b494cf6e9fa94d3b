"""The report's figures, each returned as PNG bytes: the change heatmap of a task, the Pareto view
of each pair, the α curves, gradient conflict against change, and the best model's dev predictions.

matplotlib is imported inside each function, on first use: launchers import ``cluster.report`` to
call ``write_report`` after a study, and the report's own import path stays free of it."""
from __future__ import annotations

import io
import math

import numpy as np

from cluster.report.comparisons import method_order
from cluster.report.formatting import size_mark
from mtl.task_specs import order
from mtl.tasks import TASKS


def use_headless_backend() -> None:
    """Draw without a display (a cluster node has none): Agg, before any figure is made."""
    import matplotlib          # lazily: see the module's docstring

    matplotlib.use("Agg")


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt          # lazily: see the module's docstring

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def change_heatmap(summaries, marks, task, groupings) -> bytes:
    import matplotlib.pyplot as plt          # lazily: see the module's docstring
    from matplotlib.colors import TwoSlopeNorm

    labels = sorted({k[2] for k in summaries if k[0] == task and k[1] in groupings}, key=method_order)
    data = np.full((len(labels), len(groupings)), np.nan)
    for i, label in enumerate(labels):
        for j, g in enumerate(groupings):
            if (task, g, label) in summaries:
                data[i, j] = summaries[(task, g, label)].mean
    # A floor on the colour scale: changes all near 0 stay pale instead of filling the scale with noise.
    limit = max(0.5, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groupings), 0.9 + 0.42 * len(labels)))
    image = ax.imshow(data, cmap="RdBu", norm=TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit), aspect="auto")
    for i, label in enumerate(labels):
        for j, g in enumerate(groupings):
            if np.isfinite(data[i, j]):
                s = summaries[(task, g, label)]
                star = " *" if s.significant else ""
                ax.text(j, i, f"{data[i, j]:+.1f}{size_mark(s.size, marks)}{star}", ha="center", va="center",
                        fontsize=8, color="white" if abs(data[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(len(groupings)), groupings)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(f"{TASKS[task].title} ({task}): change against single-task, %")
    fig.colorbar(image, ax=ax, label="% change")
    return _figure_bytes(fig)


def pareto_figure(views) -> bytes:
    import matplotlib.pyplot as plt          # lazily: see the module's docstring
    from matplotlib.lines import Line2D

    cols = min(3, len(views))
    rows = math.ceil(len(views) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    styles = {"addition": ("s", "black"), "PCGrad": ("^", "tab:red")}
    for ax, view in zip(axes.flat, views):
        a, b = view["tasks"]
        front = set(view["front"])
        for method, p in view["points"].items():
            if method.startswith("α="):
                marker, color = "o", cmap(0.1 + 0.8 * float(method[2:]))
            else:
                marker, color = styles.get(method, ("D", "tab:orange"))
            (xlo, xhi), (ylo, yhi) = p["x_ci"], p["y_ci"]
            if xlo is not None and ylo is not None:
                ax.errorbar(p["x"], p["y"], xerr=[[p["x"] - xlo], [xhi - p["x"]]],
                            yerr=[[p["y"] - ylo], [yhi - p["y"]]], fmt="none", ecolor="lightgrey", lw=0.8, zorder=1)
            on = method in front
            ax.scatter(p["x"], p["y"], marker=marker, color=color, s=70 if on else 40, zorder=3,
                       edgecolors="black" if on else "none", linewidths=1.3)
        _place_labels(ax, [(m[2:] if m.startswith("α=") else m, p["x"], p["y"], m in front)
                           for m, p in view["points"].items()])
        xs = [view["points"][m]["x"] for m in view["front"]]
        ys = [view["points"][m]["y"] for m in view["front"]]
        ax.plot(xs, ys, "-", color="black", lw=1.0, alpha=0.6, zorder=2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"% change of {a} ({TASKS[a].title}); α is {a}'s loss weight")
        ax.set_ylabel(f"% change of {b} ({TASKS[b].title})")
        ax.set_title(view["grouping"] + (f" ({view['variant']})" if view["variant"] else ""))
    for ax in list(axes.flat)[len(views):]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", ls="", color=cmap(0.5), label="scalarization, labelled by α"),
               Line2D([], [], marker="s", ls="", color="black", label="addition"),
               Line2D([], [], marker="^", ls="", color="tab:red", label="PCGrad"),
               Line2D([], [], marker="D", ls="", color="tab:orange", label="other"),
               Line2D([], [], marker="o", ls="-", color="black", markerfacecolor="white", markeredgewidth=1.3,
                      label="Pareto front (ringed)")]
    axes.flat[0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("Change of one task against the other's, per method (95% dev-bootstrap intervals in grey)",
                 fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


def _place_labels(ax, labels) -> None:
    """Label points without piling labels onto each other: each label takes the first of a few
    offsets around its point (nearest first) that keeps clear of the points and labels placed so
    far, else the clearest one.  α settings are labelled by their α alone (the legend says so)."""
    ax.autoscale_view()
    to_px = ax.transData.transform
    scale = ax.figure.dpi / 72                                # offsets are in points, positions in pixels
    taken = [tuple(to_px((x, y))) for _, x, y, _ in labels]
    offsets = [(5, 3), (5, -9), (-5, 3), (-5, -9), (5, 10), (-5, -16)]
    for text, x, y, bold in sorted(labels, key=lambda item: (item[1], item[2])):
        px, py = to_px((x, y))

        def clearance(o):
            cx, cy = px + (o[0] + 6 * np.sign(o[0])) * scale, py + (o[1] + 3) * scale   # the label's centre, roughly
            return min(np.hypot(cx - tx, cy - ty) for tx, ty in taken)
        best = next((o for o in offsets if clearance(o) > 11 * scale), max(offsets, key=clearance))
        taken.append((px + (best[0] + 6 * np.sign(best[0])) * scale, py + (best[1] + 3) * scale))
        ax.annotate(text, (x, y), xytext=best, textcoords="offset points", fontsize=7.5,
                    ha="left" if best[0] > 0 else "right", fontweight="bold" if bold else "normal")


def alpha_figure(curves) -> bytes:
    import matplotlib.pyplot as plt          # lazily: see the module's docstring

    tasks = order(t for t, _ in curves)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, grouping), c in sorted(curves.items()):
            if t != task:
                continue
            w = np.array([p[0] for p in c["points"]])
            line = ax.plot(w, [p[1] for p in c["points"]], "o", alpha=0.7)[0]
            grid = np.linspace(0, 1, 101)
            a, b, k = c["fit"]["coef"]
            ax.plot(grid, a * grid ** 2 + b * grid + k, "-", color=line.get_color(),
                    label=f"{grouping}: R²={c['fit']['r2']:.2f}, max at {c['fit']['argmax']:.2f}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"weight of {task}'s loss")
        ax.set_ylabel("% change against single-task")
        ax.set_title(TASKS[task].title)
        ax.legend(fontsize=7)
    return _figure_bytes(fig)


def conflict_figure(rows) -> bytes:
    import matplotlib.pyplot as plt          # lazily: see the module's docstring

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for row in rows:
        for key, value in row.items():
            if key.startswith("change/") and value is not None:
                ax.scatter(row["cos_mean"], value)
                ax.annotate(f"{key.split('/')[1]} in {row['grouping']}", (row["cos_mean"], value), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("mean cosine of the two tasks' gradients (training)")
    ax.set_ylabel("% change against single-task")
    ax.set_title("Does gradient conflict predict harm?")
    return _figure_bytes(fig)


def prediction_figure(task: str, pred, gold) -> bytes:
    import matplotlib.pyplot as plt          # lazily: see the module's docstring

    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    if TASKS[task].regression:
        ax.scatter(gold, pred, s=8, alpha=0.6)
        ax.plot([0, 5], [0, 5], "--", color="grey", label="ideal")
        ax.set_xlabel("true similarity")
        ax.set_ylabel("predicted similarity")
        ax.legend(fontsize=7)
    else:
        k = TASKS[task].num_outputs if TASKS[task].num_outputs > 1 else 2
        matrix = np.zeros((k, k), dtype=int)
        for g, p in zip(gold.astype(int), pred.astype(int)):
            if 0 <= g < k and 0 <= p < k:          # a label outside the task's classes is not drawn
                matrix[g, p] += 1
        ax.imshow(matrix, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    ax.set_title(f"{TASKS[task].title} ({task}), best model")
    return _figure_bytes(fig)
