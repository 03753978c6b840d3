"""rmt-export's progress: the validation runs report every step of a known total, and the
CLI draws them as click progress bars on a terminal only."""

from __future__ import annotations

import io

from rmt_deploy.cli import _phase_bars
from rmt_deploy.export.comparator import compare
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.options import RuntimeOptions


def test_compare_reports_every_step_up_to_its_total(encoder_export):
    manifest = read_manifest(encoder_export)
    engine = OnnxRuntimeEngine(manifest, RuntimeOptions(threads=1))
    calls = []
    compare(engine, engine, manifest.load_initial_state(), 4,
            progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    # 2 modes x (step, write) passes x (4 + 6 segments: the two validation batches)
    assert total == 2 * 2 * (4 + 6)
    assert calls == [(done, total) for done in range(1, total + 1)]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bars_show_on_a_terminal_only():
    assert _phase_bars(io.StringIO()) is None
    stream = Terminal()
    show = _phase_bars(stream)
    for done in range(1, 4):
        show("validating against PyTorch", done, 3)
    assert "validating against PyTorch" in stream.getvalue()
    assert "3/3" in stream.getvalue()


def test_a_long_judgement_says_how_long_it_will_take(monkeypatch):
    from rmt_deploy.export import pipeline

    clock = iter(range(0, 1000, 30))  # 30 s a step
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
    lines, seen = [], []
    step = pipeline._estimating(lambda d, t: seen.append(d), lines.append, "fp16 closed loop")
    for done in range(1, 11):
        step(done, 10)
    assert seen == list(range(1, 11))
    assert lines == ["fp16 closed loop: 10 paired steps, about 0.8 more minutes at the pace "
                     "of the first (--drift-segments sets the run's length)"]
