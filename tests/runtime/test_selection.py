"""The backend chosen by measurement: candidates, stand-in timings, the cache (per model,
host and versions, written atomically outside the export folder), what rmt-run says, and
a real first run that leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rmt_deploy.errors import BackendError, ConfigError
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime import open_model, selection
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.backends.wrapped import WrappedEngine, WrappedState
from rmt_deploy.runtime.opener import _engine
from rmt_deploy.runtime.options import RuntimeOptions, host_cpus
from rmt_deploy.runtime.selection import BackendChoice, Candidate, choose_backend

ONE = 1
ALL = host_cpus()


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measuring on, the cache in a temporary folder; returns that folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RMT_DEPLOY_MEASURE", "1")
    monkeypatch.setenv("RMT_DEPLOY_CACHE_DIR", str(cache))
    return cache


class StandIn:
    """Stand-in timings by candidate label; records what it was asked to time."""

    def __init__(self, ms: dict[str, float], default: float = 10.0) -> None:
        self.ms, self.default, self.calls = ms, default, []

    def __call__(self, engines, manifest):
        labels = [candidate.label for candidate in engines]
        self.calls.append(labels)
        return {label: self.ms.get(label, self.default) for label in labels}


def label(backend, threads, fusions=False, hint=None):
    return Candidate(backend, threads, fusions, hint).label


def opener(manifest):
    opened = []

    def open_engine(options):
        opened.append(options)
        return _engine(manifest, options)

    return open_engine, opened


def test_candidates_cover_threads_and_backends(encoder_export):
    manifest = read_manifest(encoder_export)
    found = selection.candidates(manifest, RuntimeOptions(), ("onnxruntime", "openvino"))
    threads = sorted({1, ALL})
    assert [c.label for c in found] == (
        [label("onnxruntime", t) for t in threads]
        + [label("openvino", t, hint="latency") for t in threads])
    fixed = selection.candidates(manifest, RuntimeOptions(threads=1, hint="throughput"),
                                 ("onnxruntime", "openvino"))
    assert [c.label for c in fixed] == [label("onnxruntime", 1),
                                        label("openvino", 1, hint="throughput")]
    winner = Candidate("onnxruntime", 1)
    assert selection.refinements(winner, manifest, RuntimeOptions()) == [
        Candidate("onnxruntime", 1, fusions=True)]
    assert selection.refinements(winner, manifest, RuntimeOptions(fusions=False)) == []
    ov = Candidate("openvino", 2, hint="latency")
    assert selection.refinements(ov, manifest, RuntimeOptions()) == [
        Candidate("openvino", 2, hint="throughput")]


def test_the_fastest_candidate_wins_and_is_cached(encoder_export, measuring):
    manifest = read_manifest(encoder_export)
    fast = label("openvino", ALL, hint="latency")
    timer = StandIn({fast: 1.0, label("onnxruntime", 1): 2.0})
    open_engine, opened = opener(manifest)
    choice, engine = choose_backend(manifest, RuntimeOptions(), open_engine, measure=timer)
    assert (choice.backend, choice.threads, choice.hint) == ("openvino", ALL, "latency") or (
        ALL > 1 and choice.hint == "throughput")
    assert engine.name == "openvino" and choice.reason == "measured on this host"
    assert timer.calls[0][:2] == [label("onnxruntime", t) for t in sorted({1, ALL})][:2]
    if ALL > 1:  # stage two: the winner against its throughput hint, nothing else
        assert timer.calls[1] == [fast, label("openvino", ALL, hint="throughput")]
    assert choice.timings[fast] == 1.0
    files = list(measuring.iterdir())
    assert len(files) == 1 and files[0].name.startswith("backend-")
    assert json.loads(files[0].read_text())["backend"] == "openvino"
    assert not list(Path(encoder_export).glob("backend-*"))  # never in the export folder

    again, engine = choose_backend(manifest, RuntimeOptions(), open_engine,
                                   measure=StandIn({}))
    assert again.reason.startswith("cached, measured on this host at ")
    assert (again.backend, again.threads, again.hint) == (choice.backend, choice.threads,
                                                          choice.hint)
    assert engine.name == "openvino" and len(timer.calls) in (1, 2)
    assert opened[-1].backend == "openvino" and opened[-1].threads == choice.threads


def test_ties_go_to_the_plainer_candidate_and_fusions_are_measured(encoder_export,
                                                                     measuring):
    manifest = read_manifest(encoder_export)
    plain, fused = label("onnxruntime", 1), label("onnxruntime", 1, fusions=True)
    timer = StandIn({plain: 1.00, fused: 0.99})  # within TIE: not worth the fusions
    choice, engine = choose_backend(manifest, RuntimeOptions(), opener(manifest)[0],
                                    measure=timer)
    assert timer.calls[-1] == [plain, fused]
    assert (choice.backend, choice.threads, choice.fusions) == ("onnxruntime", 1, None)
    assert not engine.fusions
    faster = StandIn({plain: 1.0, fused: 0.5})
    choice, engine = choose_backend(manifest, RuntimeOptions(precision="fp32"),
                                    opener(manifest)[0], measure=faster,
                                    cache=measuring / "other")
    assert choice.fusions and engine.fusions
    assert "fused" in choice.describe() and "0.5 ms/step" in choice.describe()


def test_the_cache_is_keyed_by_model_settings_and_host(encoder_export, decoder_export,
                                                       monkeypatch, measuring):
    enc, dec = read_manifest(encoder_export), read_manifest(decoder_export)
    key = selection.cache_file(enc, RuntimeOptions())
    assert key.parent == measuring
    assert key == selection.cache_file(enc, RuntimeOptions())
    assert key != selection.cache_file(dec, RuntimeOptions())
    assert key != selection.cache_file(enc, RuntimeOptions(precision="fp16"))
    assert key != selection.cache_file(enc, RuntimeOptions(threads=1))
    monkeypatch.setattr(selection, "host_key", lambda: {"cpu": "another"})
    assert key != selection.cache_file(enc, RuntimeOptions())


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RMT_DEPLOY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert selection.cache_folder() == tmp_path / "xdg" / "rmt-deploy"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert selection.cache_folder() == tmp_path / "home" / ".cache" / "rmt-deploy"
    monkeypatch.setenv("RMT_DEPLOY_CACHE_DIR", str(tmp_path / "mine"))
    assert selection.cache_folder() == tmp_path / "mine"


def test_a_damaged_or_stale_cache_is_measured_again(encoder_export, measuring):
    manifest = read_manifest(encoder_export)
    path = selection.cache_file(manifest, RuntimeOptions())
    path.parent.mkdir(parents=True)
    for text in ("{not json", json.dumps({"backend": "tensorrt", "reason": "x",
                                          "threads": 1})):
        path.write_text(text)
        timer = StandIn({label("onnxruntime", 1): 1.0})
        choice, _ = choose_backend(manifest, RuntimeOptions(), opener(manifest)[0],
                                   measure=timer)
        assert timer.calls and choice.reason == "measured on this host"
        assert json.loads(path.read_text())["backend"] == "onnxruntime"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no work left


def test_an_unwritable_cache_never_fails_the_run(encoder_export, monkeypatch, tmp_path):
    monkeypatch.setenv("RMT_DEPLOY_MEASURE", "1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RMT_DEPLOY_CACHE_DIR", str(blocker / "cache"))
    manifest = read_manifest(encoder_export)
    choice, engine = choose_backend(manifest, RuntimeOptions(), opener(manifest)[0],
                                    measure=StandIn({}))
    assert choice.reason == "measured on this host" and engine is not None


class Perturbed(WrappedEngine):
    """An engine whose memory is off by ``error``."""

    def __init__(self, engine, error: float) -> None:
        super().__init__(engine)
        self.error = error

    def wrap(self, state):
        return _PerturbedState(self, state)


class _PerturbedState(WrappedState):
    def state(self):
        state = self.inner.state()
        return {**state, "memory_in": state["memory_in"] + self.owner.error}


def test_candidates_that_disagree_or_fail_to_open_are_rejected(encoder_export, measuring):
    manifest = read_manifest(encoder_export)

    def open_engine(options):
        if options.backend == "openvino" and options.threads == 1:
            raise BackendError("openvino cannot compile it")
        engine = _engine(manifest, options)
        return Perturbed(engine, 1e-2) if options.backend == "openvino" else engine

    timer = StandIn({label("openvino", ALL, hint="latency"): 0.1})
    choice, engine = choose_backend(manifest, RuntimeOptions(), open_engine, measure=timer)
    assert choice.backend == "onnxruntime"
    assert "cannot compile" in choice.rejected[label("openvino", 1, hint="latency")]
    if ALL > 1:
        assert "differs" in choice.rejected[label("openvino", ALL, hint="latency")]
    assert all(not name.startswith("openvino") for call in timer.calls for name in call)


def test_measuring_off_or_a_backend_given_measures_nothing(encoder_export, measuring,
                                                          monkeypatch):
    def fail(*_args):
        raise AssertionError("measured")

    monkeypatch.setattr(selection, "time_steps", fail)
    monkeypatch.setenv("RMT_DEPLOY_MEASURE", "0")
    model = open_model(encoder_export)
    assert model.backend == "onnxruntime" and "measuring off" in model.choice.reason
    hinted = open_model(encoder_export, hint="throughput")  # OpenVINO's hint: not for ORT
    assert hinted.backend == "onnxruntime" and hinted.choice.hint is None
    monkeypatch.setenv("RMT_DEPLOY_MEASURE", "1")
    model = open_model(encoder_export, backend="openvino", threads=1)
    assert model.backend == "openvino" and model.choice.reason == "requested"
    assert model.choice.describe() == "1 thread, requested"
    assert not measuring.exists()


def test_open_model_measures_once_and_runs_say_why(encoder_export, measuring, monkeypatch):
    timer = StandIn({label("onnxruntime", 1): 0.5})
    monkeypatch.setattr(selection, "time_steps", timer)
    model = open_model(encoder_export)
    assert model.backend == "onnxruntime" and model.choice.threads == 1
    run = model.run([[5, 6, 7, 8, 9, 10, 11]])
    assert run.choice == model.choice and run.choice.timings[label("onnxruntime", 1)] == 0.5
    calls = len(timer.calls)
    again = open_model(encoder_export)
    assert len(timer.calls) == calls and again.choice.reason.startswith("cached")
    np.testing.assert_allclose(again.run_one([5, 6, 7, 8, 9, 10, 11]).logits,
                               run.outputs[0].logits, atol=1e-6)


class Clocked(WrappedEngine):
    """Each step advances a shared stand-in clock by ``seconds``."""

    def __init__(self, engine, clock: list[float], seconds: float) -> None:
        super().__init__(engine)
        self.clock, self.seconds, self.steps = clock, seconds, 0

    def wrap(self, state):
        return _ClockedState(self, state)


class _ClockedState(WrappedState):
    def step(self, input_ids, attention_mask, logits=True):
        self.owner.clock[0] += self.owner.seconds
        self.owner.steps += 1
        return super().step(input_ids, attention_mask, logits)


def test_time_steps_takes_medians_in_rounds_and_drops_the_slow(encoder_export, monkeypatch):
    manifest = read_manifest(encoder_export)
    clock = [0.0]
    monkeypatch.setattr(selection.time, "perf_counter", lambda: clock[0])
    base = OnnxRuntimeEngine(manifest, RuntimeOptions(threads=1))
    engines = {Candidate("onnxruntime", 1): Clocked(base, clock, 0.001),
               Candidate("onnxruntime", 2): Clocked(base, clock, 0.002),
               Candidate("openvino", 1, hint="latency"): Clocked(base, clock, 0.01)}
    ms = selection.time_steps(engines, manifest, budget_s=0.3, rounds=4)
    assert ms == pytest.approx({"onnxruntime 1 thread": 1.0, "onnxruntime 2 threads": 2.0,
                                "openvino 1 thread latency": 10.0})
    fast, medium, slow = (engine.steps for engine in engines.values())
    assert fast > medium > slow  # the slow one stopped after the first round
    assert sum(e.seconds * e.steps for e in engines.values()) < 0.6  # about the budget


def test_fusions_run_in_memory_and_agree(encoder_export, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    manifest = read_manifest(encoder_export)
    plain = OnnxRuntimeEngine(manifest, RuntimeOptions(threads=1))
    fused = OnnxRuntimeEngine(manifest, RuntimeOptions(threads=1, fusions=True))
    assert fused.fusions and not plain.fusions
    memory = {k: v[None] for k, v in manifest.load_initial_state().items()}
    ids = np.array([[2, *range(45, 48), 3, *range(5, 14), 3, 0]], np.int64)
    with plain.new_state(memory) as a, fused.new_state(memory) as b:
        np.testing.assert_allclose(a.step(ids, (ids != 0).astype(np.int64)),
                                   b.step(ids, (ids != 0).astype(np.int64)), atol=1e-5)
        np.testing.assert_allclose(a.state()["memory_in"], b.state()["memory_in"], atol=1e-5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, words", [
    ({"backend": "openvino", "fusions": True}, "fusions"),
    ({"precision": "int8", "fusions": True}, "fusions"),
    ({"hint": "fast"}, "hint"),
    ({"backend": "onnxruntime", "hint": "latency"}, "hint"),
])
def test_settings_for_the_wrong_backend_are_refused(options, words):
    with pytest.raises(ConfigError, match=words):
        RuntimeOptions(**options)


def test_the_openvino_hint_is_applied(encoder_export):
    manifest = read_manifest(encoder_export)
    engine = _engine(manifest, RuntimeOptions(backend="openvino", hint="throughput",
                                              threads=1))
    assert engine.hint == "throughput"
    hint = next(iter(engine.compiled.values())).get_property("PERFORMANCE_HINT")
    assert str(getattr(hint, "name", hint)).upper() == "THROUGHPUT"


def test_choice_round_trips_and_reads_well():
    choice = BackendChoice("openvino", "measured on this host", 2, None, "latency",
                           {"openvino 2 threads latency": 1.5, "onnxruntime 1 thread": 2.0,
                            "onnxruntime 2 threads": 3.0, "x": 9.0})
    assert BackendChoice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice
    assert choice.settings == "openvino 2 threads latency"
    assert choice.describe() == ("2 threads, latency, measured on this host: 1.5 ms/step; "
                                 "onnxruntime 1 thread 2; onnxruntime 2 threads 3")


def test_a_first_rmt_run_measures_caches_in_home_and_leaves_nothing_else(encoder_export,
                                                                        tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    text = tmp_path / "in.txt"
    text.write_text(" ".join(f"w{(7 * i) % 45}" for i in range(25)) + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RMT_DEPLOY_MEASURE", "RMT_DEPLOY_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    reports = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "rmt_deploy.run", str(encoder_export),
                               str(text), "--json"], capture_output=True, env=env,
                              timeout=180)
        assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
        reports.append(json.loads(proc.stdout)["backend_choice"])
    assert reports[0]["reason"] == "measured on this host"
    assert reports[1]["reason"].startswith("cached")
    assert reports[0]["timings"] and reports[0]["backend"] in ("onnxruntime", "openvino")
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert files[:2] == [".cache", ".cache/rmt-deploy"] and len(files) == 3
    assert files[2].startswith(".cache/rmt-deploy/backend-")
    assert list(tmp.iterdir()) == []


def test_large_weights_run_on_onnxruntime_without_measuring(decoder_export, measuring,
                                                           monkeypatch):
    """Memory decides for large models: ONNX Runtime maps the weights once for every
    graph, OpenVINO compiles a copy per graph; nothing is timed or cached."""
    from rmt_deploy.runtime.backends import onnxruntime as backend

    monkeypatch.setattr(backend, "SHARED_WEIGHTS_BYTES", 0)
    manifest = read_manifest(decoder_export)
    timer = StandIn({})
    open_engine, opened = opener(manifest)
    choice, engine = choose_backend(manifest, RuntimeOptions(), open_engine, measure=timer)
    assert (choice.backend, engine.name) == ("onnxruntime", "onnxruntime")
    assert choice.reason.startswith("large weights") and timer.calls == []
    assert [o.backend for o in opened] == ["onnxruntime"] and not measuring.exists()
