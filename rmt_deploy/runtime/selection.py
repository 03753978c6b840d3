"""The backend an export runs on when none is asked for, chosen by measurement: each
installed CPU backend, with the settings that matter (threads; ONNX Runtime's transformer
fusions; OpenVINO's performance hints), is timed on the model's own step, in turns and in
rounds; the fastest whose output agrees with the others is kept. The choice is cached per
model, host and library versions outside the export folder, so later runs only read it,
unless the measurement cannot be trusted: a busy host (load average) or round timings
spread wide are not cached. A run that steps much slower or faster than the cached timing
marks the entry, and the next run measures again.

Measuring happens only when ``RuntimeOptions.measure`` asks (the CLI does, the API does
not by default). ``RMT_DEPLOY_CACHE_DIR`` names the cache folder (default
``$XDG_CACHE_HOME/rmt-deploy``, else ``$HOME/.cache/rmt-deploy``; none without a home);
``RMT_DEPLOY_MEASURE=0`` turns measuring off (then onnxruntime, with its defaults). The
cache is optional: one that cannot be read, parsed or written is measured past.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy import __version__
from rmt_deploy.contract import WRITE
from rmt_deploy.errors import BackendError, RmtError
from rmt_deploy.files import atomic_path, cache_folder
from rmt_deploy.manifest import Manifest
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.backends.onnxruntime import shares_weights
from rmt_deploy.runtime.options import HINTS, RuntimeOptions, host_cpus
from rmt_deploy.segmentation import content_id_range, step_inputs

CPU_BACKENDS = ("onnxruntime", "openvino")
CACHE_VERSION = 2
BUDGET_S = 0.6  # stepping time aimed at per stage, all candidates together (loading aside)
ROUNDS = 4  # rounds of steps, candidates taking turns
SLOW = 1.5  # a candidate this much slower than the best after one round stops
TIE = 0.03  # step times within 3% count as equal: the earlier (plainer) candidate wins
SPREAD = 0.25  # a candidate's round medians further apart than this share: not cached
BUSY = 0.5  # a 1-minute load average above this many per CPU: others run, not cached
CONTRADICTED = 2.0  # a run's steps this many times slower or faster: measured again
SEEN_STEPS = 16  # steps a run must take before its step time is compared


@dataclass(frozen=True)
class Candidate:
    """A backend with the settings it is timed with."""

    backend: str
    threads: int
    fusions: bool = False  # onnxruntime: transformer fusions at session creation
    hint: str | None = None  # openvino: performance hint

    @property
    def label(self) -> str:
        extra = " fused" if self.fusions else f" {self.hint}" if self.hint else ""
        return f"{self.backend} {self.threads} thread{'s' if self.threads > 1 else ''}{extra}"

    def options(self, options: RuntimeOptions) -> RuntimeOptions:
        return dataclasses.replace(options, backend=self.backend, threads=self.threads,
                                   fusions=self.fusions if self.backend == "onnxruntime"
                                   else None, hint=self.hint, measure="off")


@dataclass(frozen=True)
class BackendChoice:
    """What backend a model runs on, with which settings, and why."""

    backend: str
    reason: str  # measured, cached, requested, only one installed, measuring off, ...
    threads: int | None = None
    fusions: bool | None = None
    hint: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # ms per step, by candidate
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why not
    measured: str | None = None  # when the timings were taken (UTC)
    timed: str | None = None  # the graph timed at batch 1: "write" (memory only) or "step"
    load: float | None = None  # the 1-minute load average when measuring began
    spread: float | None = None  # widest gap of a candidate's round medians, over its median
    uncached: str | None = None  # why this measurement was not cached
    cache: str | None = None  # the cache file read or written
    contradicted: str | None = None  # why a cached choice is measured again next run

    def _details(self) -> list[str]:
        details = []
        if self.threads:
            details.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        if self.fusions:
            details.append("fused")
        if self.hint:
            details.append(self.hint)
        return details

    @property
    def settings(self) -> str:
        """``onnxruntime 1 thread fused`` and the like."""
        return " ".join([self.backend, *self._details()])

    def describe(self) -> str:
        """The settings beyond the backend's name and why they were chosen, in one line:
        ``1 thread, measured on this host: 0.61 ms/step; openvino 2 threads ...``."""
        text = ", ".join([*self._details(), self.reason])
        own = self.timings.get(_label(self))
        if own is not None:
            others = sorted((ms, label) for label, ms in self.timings.items()
                            if label != _label(self))
            text += f": {own:.3g} ms/step" + "".join(f"; {label} {ms:.3g}"
                                                      for ms, label in others[:2])
        if self.uncached:
            text += f"; not cached: {self.uncached}"
        if self.contradicted:
            text += f"; {self.contradicted}: measured again next run"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackendChoice:
        """The choice ``to_dict`` wrote; ValueError names the first field that is missing
        or of the wrong type (a cache file is outside the tool's control)."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for name, valid in _FIELDS.items():
            if name in data and not valid(data[name]) or name not in data and name in (
                    "backend", "reason"):
                raise ValueError(f"field {name!r}: {data.get(name)!r}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _ms(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value) and value >= 0


def _optional(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or valid(value)


def _mapping(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, dict) and all(
        isinstance(key, str) and valid(item) for key, item in value.items())


#: What each field of a cached :class:`BackendChoice` may hold.
_FIELDS: dict[str, Callable[[Any], bool]] = {
    "backend": lambda value: value in CPU_BACKENDS, "reason": _text,
    "threads": _optional(lambda value: type(value) is int and value >= 1),
    "fusions": _optional(lambda value: type(value) is bool),
    "hint": _optional(lambda value: value in HINTS),
    "timings": _mapping(_ms), "rejected": _mapping(_text), "measured": _optional(_text),
    "timed": _optional(lambda value: value in ("write", "step")), "load": _optional(_ms),
    "spread": _optional(_ms), "uncached": _optional(_text), "cache": _optional(_text),
    "contradicted": _optional(_text),
}


#: ``measure(engines, manifest) -> {label: [median ms per step of each round]}``: the timer
#: (tests pass stand-ins).
Measure = Callable[[dict[Candidate, StepEngine], Manifest], dict[str, list[float]]]
#: ``open_engine(options) -> engine``.
OpenEngine = Callable[[RuntimeOptions], StepEngine]


def installed_backends() -> tuple[str, ...]:
    return tuple(name for name in CPU_BACKENDS if importlib.util.find_spec(name) is not None)


def candidates(manifest: Manifest, options: RuntimeOptions,
               backends: Sequence[str]) -> list[Candidate]:
    """Stage one, plainest first: each backend on 1 thread and on all of them (or on the
    threads asked for), with its plain settings (ONNX Runtime unfused, OpenVINO's latency
    hint) unless the options fix them."""
    threads = [options.threads] if options.threads else sorted({1, host_cpus()})
    found = []
    for backend in backends:
        for count in threads:
            if backend == "onnxruntime":
                found.append(Candidate(backend, count, fusions=bool(options.fusions)))
            else:
                found.append(Candidate(backend, count, hint=options.hint or "latency"))
    return found


def refinements(winner: Candidate, manifest: Manifest,
                options: RuntimeOptions) -> list[Candidate]:
    """Stage two, the first stage's winner with its other settings: ONNX Runtime's
    fusions (fp32 encoder graphs, where the onnx package is installed), OpenVINO's
    throughput hint (on several threads); none where the options fix them."""
    if winner.backend == "onnxruntime" and options.fusions is None and (
            manifest.config.is_encoder and options.precision == "fp32"
            and importlib.util.find_spec("onnx") is not None):
        return [dataclasses.replace(winner, fusions=True)]
    if winner.backend == "openvino" and options.hint is None and winner.threads > 1:
        return [dataclasses.replace(winner, hint="throughput")]
    return []


def choose_backend(manifest: Manifest, options: RuntimeOptions, open_engine: OpenEngine,
                   measure: Measure | None = None, cache: Path | None = None
                   ) -> tuple[BackendChoice, StepEngine]:
    """The backend for ``manifest`` when ``options.backend`` is None, and its engine:
    as ``options.measure`` says, cached (``auto``), else measured (and cached where the
    host was calm); onnxruntime where measuring is off, there is nothing to compare, or
    the weights are large (memory, not speed, decides there: measured on a GPT-2-small
    decoder RMT, 0.64 GB of peak RSS on onnxruntime against 6.9 GB while OpenVINO was
    measured too)."""
    if options.measure == "off":
        return _plain(options, open_engine, "measuring off (RuntimeOptions.measure)")
    if os.environ.get("RMT_DEPLOY_MEASURE", "1").strip().lower() in ("0", "off", "no",
                                                                     "false"):
        return _plain(options, open_engine, "measuring off (RMT_DEPLOY_MEASURE)")
    if shares_weights(manifest):
        return _plain(options, open_engine, "large weights: onnxruntime maps them once for "
                      "all the graphs (OpenVINO would compile a copy of them per graph)")
    found = candidates(manifest, options, installed_backends())
    if not found or _has_cuda():
        return _plain(options, open_engine,
                      "CUDA (onnxruntime-gpu)" if found else "no CPU backend to measure")
    possible = found + [r for c in found for r in refinements(c, manifest, options)]
    if len(possible) == 1:
        return _given(found[0], options, open_engine, "the only candidate")
    path = cache_file(manifest, options, cache)
    cached = read_cached(path, {c.label for c in possible}) if options.measure == "auto" \
        else None
    if cached is not None and not cached.contradicted:
        winner = next(c for c in possible if c.label == _label(cached))
        return cached, open_engine(winner.options(options))
    choice, engine = _measure(manifest, options, open_engine, found, measure or time_steps)
    if cached is not None:
        choice = dataclasses.replace(choice, reason=f"{choice.reason} again (the cached "
                                     f"choice was contradicted: {cached.contradicted})")
    if path is None:
        choice = dataclasses.replace(choice, uncached=choice.uncached or "no cache folder "
                                     "(no HOME, XDG_CACHE_HOME or RMT_DEPLOY_CACHE_DIR)")
    elif choice.uncached is None:
        choice = dataclasses.replace(choice, **(
            {"cache": str(path)} if write_cached(path, choice)
            else {"uncached": f"{path.parent} cannot be written"}))
    return choice, engine


def _plain(options: RuntimeOptions, open_engine: OpenEngine,
           reason: str) -> tuple[BackendChoice, StepEngine]:
    options = dataclasses.replace(options, backend="onnxruntime", hint=None,  # OpenVINO's
                                  measure="off")
    return BackendChoice("onnxruntime", reason, options.threads, options.fusions or None,
                         None), open_engine(options)


def _given(candidate: Candidate, options: RuntimeOptions, open_engine: OpenEngine,
           reason: str) -> tuple[BackendChoice, StepEngine]:
    return (BackendChoice(candidate.backend, reason, candidate.threads,
                          candidate.fusions or None, candidate.hint),
            open_engine(candidate.options(options)))


def _label(choice: BackendChoice) -> str:
    return Candidate(choice.backend, choice.threads or 1, bool(choice.fusions),
                     choice.hint).label


def _measure(manifest: Manifest, options: RuntimeOptions, open_engine: OpenEngine,
             found: list[Candidate], measure: Measure) -> tuple[BackendChoice, StepEngine]:
    """Time stage one, then the winner against its refinements; the fastest wins (within
    :data:`TIE`, the one measured first)."""
    rejected: dict[str, str] = {}
    engines = _open(found, options, open_engine, manifest, rejected)
    if not engines:
        raise BackendError("no CPU backend can run this model: "
                           + "; ".join(f"{k}: {v}" for k, v in rejected.items()))
    load = machine_load()
    rounds = measure(engines, manifest) if len(engines) > 1 else {}
    timings = {label: statistics.median(values) for label, values in rounds.items()}
    spreads = [_spread(rounds)]
    winner = _fastest(list(engines), timings)
    extra = _open(refinements(winner, manifest, options), options, open_engine, manifest,
                  rejected, against=(winner, engines[winner]))
    if extra:  # timed against the winner again; shown on the first stage's scale
        final = {winner: engines[winner], **extra}
        again_rounds = measure(final, manifest)
        spreads.append(_spread(again_rounds))
        again = {label: statistics.median(values) for label, values in again_rounds.items()}
        scale = timings.get(winner.label, again[winner.label]) / again[winner.label]
        timings.update({c.label: again[c.label] * scale for c in extra})
        winner = _fastest(list(final), {**timings, winner.label: again[winner.label] * scale})
        engines.update(extra)
    spread = max(spreads)
    choice = BackendChoice(winner.backend, "measured on this host", winner.threads,
                           winner.fusions or None, winner.hint,
                           {label: round(ms, 4) for label, ms in timings.items()}, rejected,
                           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "write" if WRITE in manifest.graphs else "step",
                           None if load is None else round(load, 2), round(spread, 3),
                           _unsettled(load, spread))
    return choice, engines[winner]


def machine_load() -> float | None:
    """The host's 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _spread(rounds: dict[str, list[float]]) -> float:
    """The widest gap between a candidate's round medians, as a share of its median
    (candidates timed in one round only give none)."""
    return max(((max(values) - min(values)) / statistics.median(values)
                for values in rounds.values() if len(values) > 1), default=0.0)


def _unsettled(load: float | None, spread: float) -> str | None:
    """Why a measurement is not worth caching: the host was busy, or the rounds disagree."""
    cpus = os.cpu_count() or 1
    if load is not None and load > BUSY * cpus:
        return (f"the host was busy (load average {load:.2f} on {cpus} CPU"
                f"{'s' if cpus > 1 else ''}); run with --measure when it is idle")
    if spread > SPREAD:
        return (f"the rounds' timings spread {spread:.0%} (over {SPREAD:.0%}): other work "
                "interfered; run with --measure when the host is idle")
    return None


def _open(found: list[Candidate], options: RuntimeOptions, open_engine: OpenEngine,
          manifest: Manifest, rejected: dict[str, str],
          against: tuple[Candidate, StepEngine] | None = None) -> dict[Candidate, StepEngine]:
    """Engines of the candidates that load and agree (with ``against`` where given);
    the others are recorded in ``rejected`` with the reason."""
    engines = dict([against]) if against else {}
    for candidate in found:
        try:
            engines[candidate] = open_engine(candidate.options(options))
        except RmtError as error:  # a backend that cannot run this model is no failure
            rejected[candidate.label] = str(error)
    for label, why in disagreeing(engines, manifest, options.precision).items():
        rejected[label] = why
        engines.pop(next(c for c in engines if c.label == label))
    if against:
        engines.pop(against[0], None)
    return engines


def _fastest(found: list[Candidate], timings: dict[str, float]) -> Candidate:
    if not timings:
        return found[0]
    best = min(timings[c.label] for c in found)
    return next(c for c in found if timings[c.label] <= best * (1 + TIE))


def _probe(manifest: Manifest) -> tuple[np.ndarray, np.ndarray, State, bool]:
    """A full segment of the model's own layout, its initial state, and whether the
    write graph (what every segment but the last runs) is what is timed."""
    config = manifest.config
    low, high = content_id_range(config)
    tokens = low + np.arange(config.segment_size) * 7919 % max(1, high - low)
    ids, mask = step_inputs([tokens], config)
    state = {name: value[None] for name, value in manifest.load_initial_state().items()}
    return ids, mask, state, WRITE in manifest.graphs


def disagreeing(engines: dict[Candidate, StepEngine], manifest: Manifest,
                precision: str = "fp32") -> dict[str, str]:
    """Candidates computing fp32 whose new state after one step differs from the first's
    by more than the export's open-loop tolerance (reduced precision is judged at
    export)."""
    exact = [c for c, engine in engines.items() if getattr(engine, "precision", "fp32") == "fp32"]
    if precision != "fp32" or len(exact) < 2:
        return {}
    ids, mask, memory, write = _probe(manifest)
    tolerance = manifest.validation.get("fp32", {}).get("tolerance", {}).get("open_loop", 1e-4)
    results = {}
    for candidate in exact:
        with engines[candidate].new_state(memory) as state:
            state.step(ids, mask, logits=not write)
            results[candidate] = state.state()
    first = exact[0]
    errors = {c: max(float(np.abs(results[c][name] - array).max())
                     for name, array in results[first].items()) for c in exact}
    return {c.label: f"its state differs from {first.label}'s by {error:.2g}"
            for c, error in errors.items() if not error <= tolerance}


def time_steps(engines: dict[Candidate, StepEngine], manifest: Manifest,
               budget_s: float = BUDGET_S, rounds: int = ROUNDS) -> dict[str, list[float]]:
    """Median ms per step of each engine in each round, on the model's step at batch 1
    (the write graph where there is one). Candidates take
    turns in rounds (a burst of load hits them all), a block of steps each, every step
    timed and a block's first not counted (the threads of the one before may still be
    spinning); a step slower than the budget allows runs twice a round in two rounds. A
    candidate :data:`SLOW` times behind after the first round stops."""
    ids, mask, memory, write = _probe(manifest)
    states = {candidate: engine.new_state(memory) for candidate, engine in engines.items()}
    samples: dict[Candidate, list[list[float]]] = {candidate: [] for candidate in engines}
    try:
        block = {}
        for candidate, state in states.items():
            started = time.perf_counter()
            state.step(ids, mask, logits=not write)  # warm-up: allocations, first run
            block[candidate] = max(2, min(64, int(budget_s / rounds / len(states)
                                                  / max(time.perf_counter() - started, 1e-6))))
        if all(count == 2 for count in block.values()):
            rounds = 2
        live = list(states)
        for done in range(rounds):
            for candidate in live:
                state, times = states[candidate], []
                for index in range(block[candidate]):
                    started = time.perf_counter()
                    state.step(ids, mask, logits=not write)
                    if index:
                        times.append(time.perf_counter() - started)
                samples[candidate].append(times)
            if done == 0 and len(live) > 2:
                best = min(statistics.median(samples[c][0]) for c in live)
                live = [c for c in live if statistics.median(samples[c][0]) <= SLOW * best]
    finally:
        for state in states.values():
            state.close()
    return {candidate.label: [1000 * statistics.median(times) for times in values]
            for candidate, values in samples.items()}


def _has_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# -- the cache --------------------------------------------------------------------------


def host_key() -> dict[str, Any]:
    """What a measurement holds for: the CPU (model, flags, CPUs this process may use) and
    the versions of the libraries that run the step."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        model = lines.get("model name\t", model).strip()
        flags = lines.get("flags\t\t", "").strip()
    except OSError:
        pass
    versions = {"rmt_deploy": __version__}
    for name in CPU_BACKENDS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"cpu": model, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cpus": host_cpus(), "machine": platform.machine(), "versions": versions}


def cache_file(manifest: Manifest, options: RuntimeOptions,
               folder: Path | None = None) -> Path | None:
    """The cache file of this model (``rmt.json``'s sha256), precision, requested
    settings and host."""
    folder = folder if folder is not None else cache_folder()
    if folder is None or manifest.folder is None:
        return None
    key = {"model": manifest.identity(),
           "precision": options.precision, "threads": options.threads,
           "fusions": options.fusions, "hint": options.hint, "host": host_key(),
           "version": CACHE_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / f"backend-{digest[:32]}.json"


def read_cached(path: Path | None, labels: set[str]) -> BackendChoice | None:
    """The cached choice, if there is one that still names a candidate and its timing;
    an unreadable, ill-typed or stale file is ignored (measured again and replaced)."""
    if path is None:
        return None
    try:
        choice = BackendChoice.from_dict(json.loads(path.read_text(encoding="utf-8")))
        label = _label(choice)
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if label not in labels or label not in choice.timings:
        return None
    return dataclasses.replace(choice, cache=str(path), reason=f"cached, {choice.reason}"
                               + (f" at {choice.measured}" if choice.measured else ""))


def write_cached(path: Path, choice: BackendChoice) -> bool:
    """Write the choice atomically; False where the cache cannot be written (skipped)."""
    try:
        with atomic_path(path) as temp:
            temp.write_text(json.dumps(choice.to_dict(), indent=1) + "\n", encoding="utf-8")
    except OSError:
        return False
    return True


def check_seen(choice: BackendChoice, steps: int, ms: float) -> BackendChoice:
    """``choice`` as a run saw it: ``steps`` batch-1 steps of the timed graph at ``ms``
    each. A cached choice whose timing is :data:`CONTRADICTED` times off is marked in
    its cache file (the next run measures again) and returned marked; else unchanged."""
    own = choice.timings.get(_label(choice))
    if (choice.cache is None or choice.contradicted or own is None or own <= 0
            or steps < SEEN_STEPS or 1 / CONTRADICTED <= ms / own <= CONTRADICTED):
        return choice
    marked = dataclasses.replace(choice, contradicted=f"a run stepped at {ms:.3g} ms/step, "
                                 f"the cached timing is {own:.3g}")
    path = Path(choice.cache)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        BackendChoice.from_dict(stored)
    except (OSError, ValueError, RecursionError):  # gone or replaced by garbage: nothing to mark
        return marked
    if stored.get("measured") == choice.measured:  # still the entry this run read
        write_cached(path, BackendChoice.from_dict({**stored,
                                                    "contradicted": marked.contradicted}))
    return marked
