"""rmt-compare --plot: the drawn figure reads without an offset, shows the gates' limits,
lets no series hide another and keeps its legends off the data."""

from __future__ import annotations

import pytest
from test_compare import drifting_export

from rmt_deploy.export.compare import CompareOptions, compare_artifacts

matplotlib = pytest.importorskip("matplotlib", reason="--plot needs matplotlib")


@pytest.fixture
def drawn(encoder_checkpoint, encoder_export, tmp_path, monkeypatch):
    """The figure plot_drift saves for the export, its step graph (the same numbers) and
    a drifting copy, against the checkpoint."""
    from matplotlib.figure import Figure

    from rmt_deploy.export.drift_plot import plot_drift

    drifting = drifting_export(encoder_export, tmp_path / "drifting")
    options = CompareOptions(segments=8, threads=1)
    report = compare_artifacts(encoder_checkpoint, [encoder_export, encoder_export /
                                                    "model.onnx", drifting], options)
    saved = []
    savefig = Figure.savefig

    def keep(figure, *args, **kwargs):
        figure.canvas.draw()
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    plot_drift(report, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"
    cosine, error = saved[0].axes
    return report, cosine, error


def curves(axes):
    return [line for line in axes.lines if len(line.get_ydata()) > 2]


def test_the_cosine_axis_has_no_offset_notation(drawn):
    _, cosine, error = drawn
    for axes in (cosine, error):
        assert axes.yaxis.get_major_formatter().get_offset() == ""


def test_the_limits_are_drawn(drawn):
    report, cosine, error = drawn
    for axes, limit in ((cosine, 1 - report.options.min_memory_cosine),
                        (error, report.options.closed_loop_atol)):
        levels = [line.get_ydata() for line in axes.lines if len(line.get_ydata()) == 2]
        assert any(list(y) == pytest.approx([limit, limit]) for y in levels), levels


def test_no_series_hides_another(drawn):
    _, cosine, error = drawn
    for axes in (cosine, error):
        lines = curves(axes)
        assert len(lines) >= 3
        for i, first in enumerate(lines):
            for second in lines[i + 1:]:
                if list(first.get_ydata()) != list(second.get_ydata()):
                    continue
                look = (first.get_marker(), first.get_markevery(), first.get_linestyle(),
                        first.get_linewidth())
                assert look != (second.get_marker(), second.get_markevery(),
                                second.get_linestyle(), second.get_linewidth())
                assert first.get_marker() not in ("None", "", None)


def test_the_legends_are_outside_the_data(drawn):
    _, cosine, error = drawn
    for axes in (cosine, error):
        legend = axes.get_legend()
        assert legend is not None
        assert legend.get_window_extent().x0 >= axes.get_window_extent().x1
