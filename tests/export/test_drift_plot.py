"""rmt-compare --plot: the drawn figure reads without an offset, shows the gates' limits,
lets no series hide another and keeps its legends off the data."""

from __future__ import annotations

import pytest
from test_compare import drifting_export

from rmt_deploy.export.compare import CompareOptions, compare_artifacts

matplotlib = pytest.importorskip("matplotlib", reason="--plot needs matplotlib")


def draw(report, tmp_path, monkeypatch) -> list:
    """The axes of the figure plot_drift saves for ``report``."""
    from matplotlib.figure import Figure

    from rmt_deploy.export.drift_plot import plot_drift

    saved = []
    savefig = Figure.savefig

    def keep(figure, *args, **kwargs):
        figure.canvas.draw()
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    plot_drift(report, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"
    return saved[0].axes


@pytest.fixture
def drawn(encoder_checkpoint, encoder_export, tmp_path, monkeypatch):
    """The figure plot_drift saves for the export, its step graph (the same numbers) and
    a drifting copy, against the checkpoint."""
    drifting = drifting_export(encoder_export, tmp_path / "drifting")
    options = CompareOptions(segments=8, threads=1)
    report = compare_artifacts(encoder_checkpoint, [encoder_export, encoder_export /
                                                    "model.onnx", drifting], options)
    cosine, error = draw(report, tmp_path, monkeypatch)
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


def test_an_armt_draws_each_layers_state_cosine(armt_export, tmp_path, monkeypatch):
    """An ARMT (per-layer state pairs A.i, z.i): a third panel draws 1 - the cosine of
    each layer's A, a colour per layer and a line style per candidate; the error panel
    draws each per-layer family once, the worst of its layers."""
    from rmt_deploy.export.drift_plot import FLOOR

    drifting = drifting_export(armt_export, tmp_path / "drifting")
    report = compare_artifacts(armt_export, [armt_export / "model.onnx", drifting],
                               CompareOptions(segments=8, threads=1))
    _, error, layers = draw(report, tmp_path, monkeypatch)
    closed = [c.errors.closed_loop.series for c in report.comparisons]
    names = [f"A_out.{layer}" for layer in range(2)]
    expected = [[max(1 - v, FLOOR) for v in series.memory_cosine[name]]
                for series in closed for name in names]
    drawn_layers = curves(layers)
    assert [list(line.get_ydata()) for line in drawn_layers] == expected
    assert any(max(y) > FLOOR for y in expected)  # the drifting copy's A drifts
    colours = [line.get_color() for line in drawn_layers]
    assert colours[0] != colours[1] and colours[:2] == colours[2:]  # per layer
    styles = [line.get_linestyle() for line in drawn_layers]
    assert styles[0] == styles[1] != styles[2] == styles[3]  # per candidate
    assert "A_out" in layers.get_ylabel()
    families = ["logits", "A_out.*", "z_out.*", "started_out", "write_A_out.*",
                "write_z_out.*", "write_started_out"]
    drawn_errors = curves(error)
    assert len(drawn_errors) == len(closed) * len(families)
    worst_a = [max(max(a, b), FLOOR) for a, b in zip(closed[1].max_abs["A_out.0"],
                                                     closed[1].max_abs["A_out.1"],
                                                     strict=True)]
    assert list(drawn_errors[len(families) + 1].get_ydata()) == worst_a
    labels = [text.get_text() for text in error.get_legend().get_texts()]
    assert labels[:len(families)] == [
        f"{f} (worst of 2 layers)" if f.endswith("*") else f for f in families]
    for axes in (error, layers):
        assert axes.get_legend().get_window_extent().x0 >= axes.get_window_extent().x1
