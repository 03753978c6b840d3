"""``rmt-compare --plot``: the closed-loop drift against the segment, one colour and
marker per candidate (its backend and precision), one line style per output, with the
gates' limits drawn: 1 - memory cosine and max abs error, both on log axes, so values
near a cosine of 1 read without an offset (needs matplotlib: the ``plot`` extra).

A model whose state comes per layer (an armt's ``A.i``, ``z.i``) draws each family of
per-layer outputs as one error line (the worst of its layers), and gains a third panel:
1 - the cosine of each layer's first state family (``A_out.i``), one colour per layer
and one line style per candidate."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rmt_deploy.errors import RmtError
from rmt_deploy.export.compare import Report
from rmt_deploy.export.plot_file import PLOT_METADATA
from rmt_deploy.files import atomic_path

FLOOR = 1e-12  # where exact agreement (0) is drawn on the log axes
MARKERS = "osD^vP*X"
# a line style per output, in the order the outputs come (the limits are drawn "-.")
LINESTYLES = ("-", "--", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)),
              (0, (8, 2, 1, 2)), (0, (2, 1)))
LIMIT = {"color": "red", "linestyle": "-.", "linewidth": 1.2}
LAYERED = re.compile(r"(?P<family>.+)\.(?P<layer>\d+)")  # a per-layer output: A_out.3
WRITE = "write_"  # the write graph's outputs: the step's state again, without logits


def output_families(names: Iterable[str]) -> dict[str, list[str]]:
    """``names`` grouped in order: the per-layer outputs of one family (``A_out.0``,
    ``A_out.1``, ...) under ``A_out.*``, every other output alone under its name."""
    families: dict[str, list[str]] = {}
    for name in names:
        match = LAYERED.fullmatch(name)
        families.setdefault(f"{match['family']}.*" if match else name, []).append(name)
    return families


def layered_family(names: Iterable[str]) -> list[str]:
    """The step's first family of several per-layer outputs (an armt's ``A_out.i``), in
    layer order; empty for a model with one state tensor."""
    for family, members in output_families(n for n in names if not n.startswith(WRITE)).items():
        if family.endswith(".*") and len(members) > 1:
            return sorted(members, key=lambda name: int(LAYERED.fullmatch(name)["layer"]))
    return []


def _worst(series: Mapping[str, Sequence[float]], members: Sequence[str]) -> list[float]:
    """Per segment, the largest of ``members``' values."""
    return [max(column) for column in itertools.zip_longest(
        *(series[name] for name in members), fillvalue=0.0)]


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
    closed = [comparison.errors.closed_loop.series for comparison in report.comparisons]
    families = output_families(dict.fromkeys(name for series in closed
                                             for name in series.max_abs))
    layers = layered_family(dict.fromkeys(name for series in closed
                                          for name in series.memory_cosine))
    figure, axes = pyplot.subplots(3 if layers else 2, 1, sharex=True,
                                   figsize=(10, 9.5 if layers else 6.5))
    cosine, error = axes[:2]
    styles = {family: LINESTYLES[index % len(LINESTYLES)]
              for index, family in enumerate(families)}
    try:
        candidates = []
        for index, (comparison, series) in enumerate(zip(report.comparisons, closed,
                                                         strict=True)):
            colour = f"C{index % 10}"
            # markers staggered per candidate, lines thinner for each later one: curves
            # that coincide still show every candidate
            look = {"color": colour, "marker": MARKERS[index % len(MARKERS)], "alpha": 0.85,
                    "markevery": (index, len(report.comparisons) + 2), "markersize": 5,
                    "linewidth": max(0.8, 2.4 - 0.5 * index)}
            cosine.plot([max(1 - v, FLOOR) for v in series.worst_memory_cosine()], **look)
            for family, members in families.items():
                present = [name for name in members if name in series.max_abs]
                if present:
                    error.plot([max(v, FLOOR) for v in _worst(series.max_abs, present)],
                               **{**look, "linestyle": styles[family]})
            candidates.append(Line2D([], [], color=colour, marker=look["marker"],
                                     label=comparison.candidate))
            if layers:
                _plot_layers(axes[2], series.memory_cosine, layers, look,
                             LINESTYLES[index % len(LINESTYLES)])
        cosine.axhline(1 - options.min_memory_cosine, **LIMIT)
        error.axhline(options.closed_loop_atol, **LIMIT)
        cosine.set(ylabel=f"1 - worst memory slot cosine\n(0 drawn at {FLOOR:g})", yscale="log",
                   title=f"closed loop against {report.reference} (lower is better)")
        error.set(ylabel=f"max abs error\n(0 drawn at {FLOOR:g})", yscale="log")
        cosine_limit = Line2D([], [], **LIMIT, label=f"limit: cosine {options.min_memory_cosine:g}")
        _legend(cosine, [*candidates, cosine_limit], "candidate")
        _legend(error, [*(Line2D([], [], color="black", linestyle=styles[family],
                                 label=_family_label(family, members))
                          for family, members in families.items()),
                        Line2D([], [], **LIMIT, label=f"limit: atol {options.closed_loop_atol:g}")],
                "output")
        if layers:
            _finish_layers(axes[2], layers, report, cosine_limit)
        axes[-1].set(xlabel="segment")
        for panel in axes:
            panel.grid(True, alpha=0.3)
        with atomic_path(path) as temp:
            figure.savefig(temp, format="png", dpi=120, bbox_inches="tight",
                           metadata=PLOT_METADATA)
    finally:
        pyplot.close(figure)
    return path


def _family_label(family: str, members: Sequence[str]) -> str:
    return f"{family} (worst of {len(members)} layers)" if len(members) > 1 else family


def _layer_colour(layer: int, count: int) -> tuple[float, ...]:
    from matplotlib import colormaps

    return colormaps["viridis"](layer / max(count - 1, 1))


def _plot_layers(panel, cosines: Mapping[str, Sequence[float]], layers: Sequence[str],
                 look: dict, linestyle) -> None:
    """1 - each layer's cosine, coloured by layer, in the candidate's line style and
    marker."""
    for layer, name in enumerate(layers):
        if name in cosines:
            panel.plot([max(1 - v, FLOOR) for v in cosines[name]],
                       **{**look, "color": _layer_colour(layer, len(layers)),
                          "linestyle": linestyle})


def _finish_layers(panel, layers: Sequence[str], report: Report, limit) -> None:
    from matplotlib.lines import Line2D

    family = LAYERED.fullmatch(layers[0])["family"]
    panel.axhline(1 - report.options.min_memory_cosine, **LIMIT)
    panel.set(ylabel=f"1 - cosine of each\nlayer's {family}", yscale="log")
    handles = [Line2D([], [], color=_layer_colour(layer, len(layers)), label=name)
               for layer, name in enumerate(layers)]
    handles += [Line2D([], [], color="black", marker=MARKERS[index % len(MARKERS)],
                     linestyle=LINESTYLES[index % len(LINESTYLES)], label=comparison.candidate)
                for index, comparison in enumerate(report.comparisons)]
    _legend(panel, [*handles, limit], "layer, candidate")


def _legend(panel, handles: list, title: str) -> None:
    panel.legend(handles=handles, fontsize="small", loc="upper left",
                 bbox_to_anchor=(1.01, 1), title=title)
