"""``rmt-compare --plot``: the closed-loop drift against the segment, one colour and
marker per candidate (its backend and precision), one line style per output, with the
gates' limits drawn: 1 - memory cosine and max abs error, both on log axes, so values
near a cosine of 1 read without an offset (needs matplotlib: the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from rmt_deploy.errors import RmtError
from rmt_deploy.export.compare import Report
from rmt_deploy.export.plot_file import PLOT_METADATA
from rmt_deploy.files import atomic_path

FLOOR = 1e-12  # where exact agreement (0) is drawn on the log axes
MARKERS = "osD^vP*X"
# a line style per output, in the order the outputs come (the limits are drawn "-.")
LINESTYLES = ("-", "--", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))
LIMIT = {"color": "red", "linestyle": "-.", "linewidth": 1.2}


def plot_drift(report: Report, path: str | Path) -> Path:
    """Draw ``report``'s closed-loop drift to ``path`` as PNG, marked as rmt-compare's
    (see :func:`rmt_deploy.export.plot_file.check_plot_target`), written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
        from matplotlib.lines import Line2D
    except ImportError:
        raise RmtError("--plot needs matplotlib: pip install 'rmt-deploy[plot]'") from None
    path = Path(path)
    options = report.options
    figure, (cosine, error) = pyplot.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    outputs = list(dict.fromkeys(output for comparison in report.comparisons
                                 for output in comparison.errors.closed_loop.series.max_abs))
    styles = {output: LINESTYLES[index % len(LINESTYLES)]
              for index, output in enumerate(outputs)}
    try:
        candidates = []
        for index, comparison in enumerate(report.comparisons):
            series = comparison.errors.closed_loop.series
            colour = f"C{index % 10}"
            # markers staggered per candidate, lines thinner for each later one: curves
            # that coincide still show every candidate
            look = {"color": colour, "marker": MARKERS[index % len(MARKERS)], "alpha": 0.85,
                    "markevery": (index, len(report.comparisons) + 2), "markersize": 5,
                    "linewidth": max(0.8, 2.4 - 0.5 * index)}
            cosine.plot([max(1 - v, FLOOR) for v in series.worst_memory_cosine()], **look)
            for output, values in series.max_abs.items():
                error.plot([max(v, FLOOR) for v in values],
                           **{**look, "linestyle": styles[output]})
            candidates.append(Line2D([], [], color=colour, marker=look["marker"],
                                     label=comparison.candidate))
        cosine.axhline(1 - options.min_memory_cosine, **LIMIT)
        error.axhline(options.closed_loop_atol, **LIMIT)
        cosine.set(ylabel=f"1 - worst memory slot cosine\n(0 drawn at {FLOOR:g})", yscale="log",
                   title=f"closed loop against {report.reference} (lower is better)")
        error.set(xlabel="segment", ylabel=f"max abs error\n(0 drawn at {FLOOR:g})",
                  yscale="log")
        cosine.legend(handles=[*candidates, Line2D([], [], **LIMIT, label=(
            f"limit: cosine {options.min_memory_cosine:g}"))], fontsize="small",
            loc="upper left", bbox_to_anchor=(1.01, 1), title="candidate")
        error.legend(handles=[*(Line2D([], [], color="black", linestyle=styles[o], label=o)
                                for o in outputs),
                              Line2D([], [], **LIMIT, label=(
                                  f"limit: atol {options.closed_loop_atol:g}"))],
                     fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1),
                     title="output")
        for axes in (cosine, error):
            axes.grid(True, alpha=0.3)
        with atomic_path(path) as temp:
            figure.savefig(temp, format="png", dpi=120, bbox_inches="tight",
                           metadata=PLOT_METADATA)
    finally:
        pyplot.close(figure)
    return path
