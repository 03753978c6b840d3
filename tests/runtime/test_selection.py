"""The backend chosen by measurement: candidates, stand-in timings, the cache (per model,
host and versions, written atomically outside the export folder, nothing cached from a
busy host or scattered rounds, measured again when runs contradict it, measured past when
it is damaged or cannot be written), what rmt-run says, and a real first run that leaves
nothing behind."""

from __future__ import annotations

import dataclasses
import json
import math
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
from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.opener import _engine
from rmt_deploy.runtime.options import RuntimeOptions, host_cpus
from rmt_deploy.runtime.selection import BackendChoice, Candidate, choose_backend

ONE = 1
ALL = host_cpus()
AUTO = RuntimeOptions(measure="auto")


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measuring on, a calm host, the cache in a temporary folder; returns that folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RMT_DEPLOY_MEASURE", "1")
    monkeypatch.setenv("RMT_DEPLOY_CACHE_DIR", str(cache))
    monkeypatch.setattr(selection, "machine_load", lambda: 0.0)
    return cache


class StandIn:
    """Stand-in timings by candidate label (ms, the same each round, or each round's);
    records what it was asked to time."""

    def __init__(self, ms: dict[str, float | list[float]], default: float = 10.0) -> None:
        self.ms, self.default, self.calls = ms, default, []

    def __call__(self, engines, manifest):
        labels = [candidate.label for candidate in engines]
        self.calls.append(labels)
        rounds = {label: self.ms.get(label, self.default) for label in labels}
        return {label: ms if isinstance(ms, list) else [ms] * 4 for label, ms in rounds.items()}


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
    choice, engine = choose_backend(manifest, AUTO, open_engine, measure=timer)
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

    again, engine = choose_backend(manifest, AUTO, open_engine,
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
    choice, engine = choose_backend(manifest, AUTO, opener(manifest)[0],
                                    measure=timer)
    assert timer.calls[-1] == [plain, fused]
    assert (choice.backend, choice.threads, choice.fusions) == ("onnxruntime", 1, None)
    assert not engine.fusions
    faster = StandIn({plain: 1.0, fused: 0.5})
    choice, engine = choose_backend(manifest, RuntimeOptions(precision="fp32", measure="auto"),
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
    monkeypatch.delenv("RMT_DEPLOY_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    for home in ("", "/", "relative"):  # never /.cache, never the current folder
        monkeypatch.setenv("HOME", home)
        assert selection.cache_folder() is None
    monkeypatch.delenv("HOME")
    assert selection.cache_folder() is None


def test_a_damaged_or_stale_cache_is_measured_again(encoder_export, measuring):
    manifest = read_manifest(encoder_export)
    path = selection.cache_file(manifest, RuntimeOptions())
    path.parent.mkdir(parents=True)
    for text in ("{not json", json.dumps({"backend": "tensorrt", "reason": "x",
                                          "threads": 1}), "[]", '"x"', "null", "[" * 100_000,
                 b"\xff\xfe{}"):
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        timer = StandIn({label("onnxruntime", 1): 1.0})
        choice, _ = choose_backend(manifest, AUTO, opener(manifest)[0],
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
    choice, engine = choose_backend(manifest, AUTO, opener(manifest)[0],
                                    measure=StandIn({}))
    assert choice.reason == "measured on this host" and engine is not None


GOOD = {"backend": "onnxruntime", "reason": "measured on this host", "threads": 1,
        "timings": {"onnxruntime 1 thread": 1.0, "onnxruntime 2 threads": 2.0}}


@pytest.mark.parametrize("field, value", [
    ("threads", "2"), ("threads", 0), ("threads", True), ("threads", 1.5),
    ("timings", "fast"), ("timings", ["onnxruntime 1 thread"]),
    ("timings", {"onnxruntime 1 thread": "fast"}), ("timings", {"onnxruntime 1 thread": -1}),
    ("timings", {"onnxruntime 1 thread": math.nan}), ("timings", {"onnxruntime 2 threads": 1}),
    ("backend", 3), ("backend", "tensorrt"), ("backend", None), ("reason", None),
    ("reason", ["measured"]), ("fusions", "yes"), ("fusions", 1), ("hint", "fast"),
    ("hint", 1), ("rejected", ["x"]), ("rejected", {"x": 1}), ("measured", 5),
    ("timed", "read"), ("load", "high"), ("load", math.inf), ("spread", -1),
    ("uncached", 1), ("cache", []), ("contradicted", 2)])
def test_every_ill_typed_cache_field_is_measured_past(field, value, encoder_export,
                                                      measuring):
    manifest = read_manifest(encoder_export)
    path = selection.cache_file(manifest, AUTO)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**GOOD, field: value}))
    timer = StandIn({label("onnxruntime", 1): 1.0})
    choice, engine = choose_backend(manifest, AUTO, opener(manifest)[0], measure=timer)
    assert timer.calls and choice.reason == "measured on this host", choice
    assert choice.describe().startswith("1 thread, measured on this host: 1 ms/step")
    assert BackendChoice.from_dict(json.loads(path.read_text())) == dataclasses.replace(
        choice, cache=None)  # replaced by a good entry


def test_a_well_typed_cache_is_read(encoder_export, measuring):
    """The control of the test above: the same entry, well typed, is read."""
    manifest = read_manifest(encoder_export)
    path = selection.cache_file(manifest, AUTO)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(GOOD))
    timer = StandIn({})
    choice, engine = choose_backend(manifest, AUTO, opener(manifest)[0], measure=timer)
    assert not timer.calls and choice.reason == "cached, measured on this host"
    assert choice.cache == str(path) and (engine.name, choice.threads) == ("onnxruntime", 1)


def test_a_busy_host_or_scattered_rounds_cache_nothing(encoder_export, measuring,
                                                       monkeypatch):
    manifest = read_manifest(encoder_export)
    fast, cpus = label("onnxruntime", 1), os.cpu_count() or 1
    monkeypatch.setattr(selection, "machine_load", lambda: (selection.BUSY + 0.1) * cpus)
    choice, _ = choose_backend(manifest, AUTO, opener(manifest)[0],
                               measure=StandIn({fast: 1.0}))
    assert choice.reason == "measured on this host" and choice.cache is None
    assert "the host was busy (load average" in choice.uncached
    assert "; not cached: the host was busy" in choice.describe()
    assert choice.load == pytest.approx((selection.BUSY + 0.1) * cpus, abs=0.01)
    assert not measuring.exists()

    monkeypatch.setattr(selection, "machine_load", lambda: (selection.BUSY - 0.1) * cpus)
    choice, _ = choose_backend(manifest, AUTO, opener(manifest)[0],
                               measure=StandIn({fast: [1.0, 1.0, 1.4, 1.0]}))
    assert choice.spread == pytest.approx(0.4) and "spread 40%" in choice.uncached
    assert choice.timings[fast] == 1.0 and not measuring.exists()

    choice, _ = choose_backend(manifest, AUTO, opener(manifest)[0],
                               measure=StandIn({fast: [1.0, 1.1, 1.0, 1.0]}))
    assert choice.uncached is None and choice.spread == pytest.approx(0.1)
    assert [p.name for p in measuring.iterdir()] == [Path(choice.cache).name]


def _steps_at(manifest, seconds: float, clock: list[float]):
    def open_engine(options):
        return Clocked(_engine(manifest, options), clock, seconds)
    return open_engine


def test_a_cached_choice_the_runs_contradict_is_measured_again(encoder_export, measuring,
                                                               monkeypatch):
    """Cached at 14 ms/step (say, measured under load); runs step at 1 ms: the entry is
    marked and the next run measures again. Runs that agree, or are short, change
    nothing."""
    manifest = read_manifest(encoder_export)
    clock = [0.0]
    monkeypatch.setattr(selection.time, "perf_counter", lambda: clock[0])
    one = label("onnxruntime", 1)
    first, _ = choose_backend(manifest, AUTO, opener(manifest)[0],
                              measure=StandIn({one: 14.0}, default=30.0))
    assert first.timed == "write" and first.cache is not None
    path = Path(first.cache)
    document = 5 + np.arange(manifest.config.segment_size * 20) % 40
    for seconds, length in ((0.010, len(document)), (0.001, 30)):  # agrees; too short
        cached, engine = choose_backend(manifest, AUTO, _steps_at(manifest, seconds, clock))
        assert cached.reason.startswith("cached")
        model = RMTModel(engine, manifest.load_initial_state(), choice=cached)
        assert model.run([document[:length]]).choice.contradicted is None
        assert json.loads(path.read_text())["contradicted"] is None

    cached, engine = choose_backend(manifest, AUTO, _steps_at(manifest, 0.001, clock))
    model = RMTModel(engine, manifest.load_initial_state(), choice=cached)
    run = model.run([document])
    assert run.choice is model.choice and "a run stepped at 1 ms/step, the cached timing " \
        "is 14" in model.choice.contradicted
    assert "measured again next run" in model.choice.describe()
    assert json.loads(path.read_text())["contradicted"] == model.choice.contradicted

    timer = StandIn({one: 1.0}, default=30.0)
    again, _ = choose_backend(manifest, AUTO, opener(manifest)[0], measure=timer)
    assert timer.calls and again.reason.startswith("measured on this host again (the "
                                                   "cached choice was contradicted: a run")
    stored = json.loads(path.read_text())
    assert stored["contradicted"] is None and stored["timings"][one] == 1.0


def test_the_api_measures_only_when_asked(encoder_export, measuring, monkeypatch):
    def fail(*_args):
        raise AssertionError("measured")

    monkeypatch.setattr(selection, "time_steps", fail)
    model = open_model(encoder_export)
    assert model.backend == "onnxruntime" and model.choice.reason == (
        "measuring off (RuntimeOptions.measure)")
    assert not measuring.exists()
    with pytest.raises(ConfigError, match="measure 'always'"):
        RuntimeOptions(measure="always")
    with pytest.raises(ConfigError, match="drop the backend or the measuring"):
        RuntimeOptions(measure="again", backend="onnxruntime")


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
    choice, engine = choose_backend(manifest, AUTO, open_engine, measure=timer)
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
    model = open_model(encoder_export)  # the API measures only when asked
    assert model.backend == "onnxruntime" and model.choice.reason.startswith("measuring off")
    model = open_model(encoder_export, backend="openvino", threads=1, measure="auto")
    assert model.backend == "openvino" and model.choice.reason == "requested"
    assert model.choice.describe() == "1 thread, requested"
    assert not measuring.exists()


def test_open_model_measures_once_and_runs_say_why(encoder_export, measuring, monkeypatch):
    timer = StandIn({label("onnxruntime", 1): 0.5})
    monkeypatch.setattr(selection, "time_steps", timer)
    model = open_model(encoder_export, measure="auto")
    assert model.backend == "onnxruntime" and model.choice.threads == 1
    run = model.run([[5, 6, 7, 8, 9, 10, 11]])
    assert run.choice == model.choice and run.choice.timings[label("onnxruntime", 1)] == 0.5
    calls = len(timer.calls)
    again = open_model(encoder_export, measure="auto")
    assert len(timer.calls) == calls and again.choice.reason.startswith("cached")
    fresh = open_model(encoder_export, measure="again")
    assert len(timer.calls) > calls and fresh.choice.reason == "measured on this host"
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
    assert {k: len(v) for k, v in ms.items()} == {"onnxruntime 1 thread": 4,  # rounds
                                                  "onnxruntime 2 threads": 1,
                                                  "openvino 1 thread latency": 1}
    assert {k: max(v) for k, v in ms.items()} == pytest.approx(
        {"onnxruntime 1 thread": 1.0, "onnxruntime 2 threads": 2.0,
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


def _rmt_run(export: Path, text: Path, env: dict[str, str], *options: str) -> dict:
    """rmt-run's --json report, run as a user would (measuring on: the CLI's default)."""
    env = {k: v for k, v in env.items()
           if k not in ("RMT_DEPLOY_MEASURE", "RMT_DEPLOY_CACHE_DIR", "XDG_CACHE_HOME",
                        "TORCHINDUCTOR_CACHE_DIR")}
    proc = subprocess.run([sys.executable, "-m", "rmt_deploy.run", str(export), str(text),
                           "--json", *options], capture_output=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    return json.loads(proc.stdout)


def _words(tmp_path: Path) -> Path:
    text = tmp_path / "in.txt"
    text.write_text(" ".join(f"w{(7 * i) % 45}" for i in range(25)) + "\n")
    return text


def test_a_first_rmt_run_measures_caches_in_home_and_leaves_nothing_else(encoder_export,
                                                                        tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp)}
    reports = [_rmt_run(encoder_export, _words(tmp_path), env)["backend_choice"]
               for _ in range(2)]
    assert reports[0]["reason"] == "measured on this host"
    assert reports[0]["timings"] and reports[0]["backend"] in ("onnxruntime", "openvino")
    assert reports[0]["load"] is not None and reports[0]["spread"] >= 0
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    if reports[0]["uncached"] is None:  # a calm host: cached in HOME, read the next time
        assert reports[1]["reason"].startswith("cached")
        assert files[:2] == [".cache", ".cache/rmt-deploy"] and len(files) == 3
        assert files[2].startswith(".cache/rmt-deploy/backend-")
        assert reports[0]["cache"] == reports[1]["cache"] == str(home / files[2])
    else:  # a busy host (this test cannot choose): nothing cached, measured again
        assert "--measure" in reports[0]["uncached"] and reports[0]["cache"] is None
        assert reports[1]["reason"] == "measured on this host"
        cached = [] if reports[1]["uncached"] else [reports[1]["cache"]]  # calm again?
        assert [str(home / f) for f in files if f not in (".cache", ".cache/rmt-deploy")] \
            == cached
    assert list(tmp.iterdir()) == []
    again = _rmt_run(encoder_export, _words(tmp_path), env, "--measure")["backend_choice"]
    assert again["reason"] == "measured on this host"


def _no_home(home: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "HOME"}


def _read_only_home(home: Path) -> dict[str, str]:
    home.mkdir()
    (home / ".cache").write_text("")  # no folder can be made under it, not even by root
    home.chmod(0o555)
    return {**os.environ, "HOME": str(home)}


@pytest.mark.parametrize("environment", [
    lambda home: {**os.environ, "HOME": ""}, _no_home, _read_only_home,
    lambda home: {**os.environ, "HOME": "/"}], ids=["empty", "unset", "read-only", "root"])
def test_without_a_usable_home_rmt_run_measures_and_goes_on(environment, encoder_export,
                                                           encoder_checkpoint, tmp_path):
    """No cache (HOME empty, unset, read-only, or /): the run measures, says why nothing
    is cached, writes nowhere (never /.cache); a checkpoint runs too (torch's compiler
    cache: a folder of the process's own in TMPDIR, removed at exit)."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    env = {**environment(home), "TMPDIR": str(tmp)}
    root_cache = Path("/.cache/rmt-deploy").exists()
    try:
        choice = _rmt_run(encoder_export, _words(tmp_path), env)["backend_choice"]
        assert choice["reason"] == "measured on this host" and choice["cache"] is None
        assert choice["uncached"]
        if choice["load"] <= selection.BUSY * (os.cpu_count() or 1) \
                and choice["spread"] <= selection.SPREAD:
            assert "cannot be written" in choice["uncached"] or \
                "no cache folder" in choice["uncached"]
        report = _rmt_run(encoder_checkpoint, _words(tmp_path), env)
        assert report["backend"] == "torch"
    finally:
        if home.exists():
            home.chmod(0o755)
    assert Path("/.cache/rmt-deploy").exists() == root_cache
    assert list(tmp.iterdir()) == []
    assert not home.exists() or [p.name for p in home.iterdir()] == [".cache"]


def test_large_weights_run_on_onnxruntime_without_measuring(decoder_export, measuring,
                                                           monkeypatch):
    """Memory decides for large models: ONNX Runtime maps the weights once for every
    graph, OpenVINO compiles a copy per graph; nothing is timed or cached."""
    from rmt_deploy.runtime.backends import onnxruntime as backend

    monkeypatch.setattr(backend, "SHARED_WEIGHTS_BYTES", 0)
    manifest = read_manifest(decoder_export)
    timer = StandIn({})
    open_engine, opened = opener(manifest)
    choice, engine = choose_backend(manifest, AUTO, open_engine, measure=timer)
    assert (choice.backend, engine.name) == ("onnxruntime", "onnxruntime")
    assert choice.reason.startswith("large weights") and timer.calls == []
    assert [o.backend for o in opened] == ["onnxruntime"] and not measuring.exists()
