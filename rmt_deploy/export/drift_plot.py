"""``rmt-compare --plot``: memory cosine and max abs error against the segment, one curve
per candidate (its backend and precision), from the closed-loop run (needs matplotlib:
the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from rmt_deploy.errors import RmtError
from rmt_deploy.export.compare import Report
from rmt_deploy.export.plot_file import PLOT_METADATA
from rmt_deploy.files import atomic_path


def plot_drift(report: Report, path: str | Path) -> Path:
    """Draw ``report``'s closed-loop drift to ``path`` as PNG, marked as rmt-compare's
    (see :func:`rmt_deploy.export.plot_file.check_plot_target`), written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise RmtError("--plot needs matplotlib: pip install 'rmt-deploy[plot]'") from None
    path = Path(path)
    figure, (cosine, error) = pyplot.subplots(2, 1, sharex=True, figsize=(8, 6))
    try:
        for comparison in report.comparisons:
            series = comparison.closed_loop["series"]["closed_loop"]
            cosine.plot(series["memory_cosine"], label=comparison.candidate)
            for key, values in series.items():
                if key.startswith("max_abs/"):
                    error.plot([max(v, 1e-12) for v in values],
                               label=f"{comparison.candidate}: {key.split('/', 1)[1]}")
        cosine.set(ylabel="worst memory slot cosine",
                   title=f"closed loop against {report.reference}")
        error.set(xlabel="segment", ylabel="max abs error", yscale="log")
        for axes in (cosine, error):
            axes.grid(True, alpha=0.3)
            axes.legend(fontsize="small")
        with atomic_path(path) as temp:
            figure.savefig(temp, format="png", dpi=120, bbox_inches="tight",
                           metadata=PLOT_METADATA)
    finally:
        pyplot.close(figure)
    return path
