"""Show that the tests catch the faults validation exists for: each fault is applied, one at
a time, to a fresh temporary copy of the package (never to the working tree), and the
tests that should catch it are run there; a fault is caught when one of them fails. The
same tests first run on an unchanged copy, where they must pass.

Usage: .venv/bin/python scripts/mutate.py [--only NAME ...] [--no-baseline]
Exit status 0 when every fault is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATES = "tests/export/test_gates.py"
BUILD = "tests/export/test_tensorrt_build.py"
COMPARE = "tests/export/test_compare.py"
COMPARATOR = "tests/export/test_comparator.py"
BACKEND = "tests/runtime/test_tensorrt_backend.py"
GENERATION = "tests/runtime/test_generation.py"
ODD_EVEN = "test_prefill_and_decode_after_odd_and_even_steps_equal_the_reference"


@dataclass(frozen=True)
class Fault:
    name: str
    file: str  # in the package copy
    old: str  # replaced exactly once
    new: str
    tests: tuple[str, ...]


FAULTS = (
    Fault("open-loop reset removed from validation", "rmt_deploy/export/comparator.py",
          "            self.candidate.load(self.reference.state())\n", "            pass\n",
          (f"{GATES}::test_open_loop_starts_every_step_from_the_reference_memory",)),
    Fault("memory cosine hard-coded to 1.0", "rmt_deploy/export/comparator.py",
          "worst = float(cosine.min(initial=1.0))", "worst = 1.0",
          (f"{GATES}::test_the_memory_cosine_gate_refuses_memory_slots_that_turn",)),
    Fault("create_network(1): a weakly typed network (no STRONGLY_TYPED bit)",
          "rmt_deploy/export/tensorrt_build.py",
          'return {"strongly_typed": True}', 'return {"strongly_typed": False}',
          (f"{BUILD}::test_plans_are_built_with_polygraphys_loaders_strongly_typed_without"
           "_precision_flags",)),
    Fault("TensorRT memory buffers not swapped between steps",
          "rmt_deploy/runtime/backends/tensorrt.py",
          "        result = self._run(graph, input_ids, attention_mask, logits)\n"
          "        self._parity ^= 1\n",
          "        result = self._run(graph, input_ids, attention_mask, logits)\n",
          (f"{BUILD}::test_every_plan_is_judged_closed_loop_against_fp32_and_recorded",
           f"{BACKEND}::test_tensorrt_runs_equal_onnxruntime")),
    Fault("a 1% change to one weight (the reference's largest weight matrix)",
          "rmt_deploy/runtime/backends/torch.py",
          "        self.rmt = rmt.eval().to(self.device, torch.float16 if half else "
          "torch.float32)\n",
          "        self.rmt = rmt.eval().to(self.device, torch.float16 if half else "
          "torch.float32)\n"
          "        max(self.rmt.parameters(), key=lambda p: p.numel() * (p.dim() == 2))"
          ".data.mul_(1.01)\n",
          (f"{GATES}::test_a_sound_export_passes_every_gate",)),
    Fault("NaN outputs (the TensorRT backend's logits)",
          "rmt_deploy/runtime/backends/tensorrt.py",
          "            return np.array(logits_host, dtype=np.float32)\n",
          "            return np.array(logits_host, dtype=np.float32) * np.nan\n",
          (f"{BUILD}::test_every_plan_is_judged_closed_loop_against_fp32_and_recorded",
           f"{COMPARE}::test_a_tensorrt_plan_is_compared_through_the_fake_runtime")),
    Fault("memory not fed back (ONNX Runtime's buffers not swapped)",
          "rmt_deploy/runtime/backends/onnxruntime.py",
          "        self._parity ^= 1\n", "",
          (f"{GATES}::test_a_sound_export_passes_every_gate",)),
    Fault("agreement gate never fires", "rmt_deploy/export/validate.py",
          "    if agreement >= minimum:\n", "    if True:\n",
          (f"{GATES}::test_the_agreement_gate_refuses_predictions_that_change",)),
    Fault("non-finite values not counted", "rmt_deploy/export/comparator.py",
          "bad = int(finite.size - finite.sum())", "bad = 0",
          (f"{GATES}::test_the_non_finite_gate_refuses_nan_outputs",)),
    Fault("closed-loop tolerance not enforced", "rmt_deploy/export/validate.py",
          "                        (comparison.closed_loop, tolerance.closed_loop)):",
          "                        ):",
          (f"{GATES}::test_the_closed_loop_gate_refuses_an_error_that_compounds",)),
    Fault("plans kept without their closed-loop check", "rmt_deploy/export/tensorrt_build.py",
          "        results = check_plans(unopened, options, log)\n", "        results = {}\n",
          (f"{BUILD}::test_a_plan_that_drifts_is_not_kept_and_the_folder_is_left_as_it_was",)),
    Fault("rmt-compare's open loop not judged", "rmt_deploy/export/polygraphy_judge.py",
          "        return {name: bool(result) for name, result in results.items()}\n",
          "        return {name: True for name in results}\n",
          (f"{COMPARE}::test_a_drifting_candidate_fails_in_one_line_naming_output_and_segment",)),
    Fault("the comparator's segments counted from 1", "rmt_deploy/export/comparator.py",
          "segment, paired.steps = paired.steps, paired.steps + 1",
          "segment, paired.steps = paired.steps + 1, paired.steps + 1",
          (f"{COMPARATOR}::test_export_validation_names_the_output_and_segment_where_a_fault"
           "_starts",
           f"{COMPARATOR}::test_rmt_compare_names_the_output_and_segment_where_a_fault_starts")),
    # generation and sampling (issue 21: each survived the whole suite before)
    Fault("top-p applied to the probabilities before the temperature",
          "rmt_deploy/runtime/generation.py",
          "            cumulative = np.cumsum(probabilities[order])\n",
          "            cumulative = np.cumsum(softmax(logits.astype(np.float64))[order])\n",
          (f"{GENERATION}::test_the_sampler_equals_a_reference_of_temperature_top_k_top_p",)),
    Fault("ONNX Runtime's prefill reading memory buffer 0",
          "rmt_deploy/runtime/backends/onnxruntime.py",
          "_Binding(self._engine, graph, self._buffers[self._parity],",
          "_Binding(self._engine, graph, self._buffers[0 if graph == PREFILL else "
          "self._parity],",
          (f"{GENERATION}::{ODD_EVEN}",)),
    Fault("a row's EOS done flag reset by the next token", "rmt_deploy/runtime/generation.py",
          "                generated[row].append(token)\n"
          "                done[row] = token == config.eos_token_id\n",
          "                generated[row].append(token)\n"
          "            done[row] = token == config.eos_token_id\n",
          (f"{GENERATION}::test_a_row_that_emits_eos_stays_done_while_the_others_go_on",
           f"{GENERATION}::test_sampled_generation_in_a_batch_equals_the_reference_loop")),
    Fault("the last segment not written before generation", "rmt_deploy/runtime/loop.py",
          "    counts = [count_segments(len(source), config) - int(skip_last) for source in "
          "sources]\n",
          "    counts = [max(count_segments(len(source), config) - 2 * int(skip_last), 0) "
          "for source in sources]\n",
          (f"{GENERATION}::test_generation_reads_the_memory_the_last_written_segment_left",)),
    # memory in the other modules
    Fault("OpenVINO's prefill reading memory buffer 0", "rmt_deploy/runtime/backends/openvino.py",
          "            request.set_tensor(pair.name_in, self._buffers[self._parity][pair.name_in])",
          "            request.set_tensor(pair.name_in, self._buffers[0 if graph == PREFILL else "
          "self._parity][pair.name_in])",
          (f"{GENERATION}::{ODD_EVEN}",)),
    Fault("TensorRT's prefill reading memory buffer 0", "rmt_deploy/runtime/backends/tensorrt.py",
          "_set_address(context, pair.name_in, self._buffers[self._parity][pair.name_in].ptr)",
          "_set_address(context, pair.name_in, self._buffers[0 if graph == PREFILL else "
          "self._parity][pair.name_in].ptr)",
          (f"{BACKEND}::{ODD_EVEN}",)),
    Fault("a restored session starting from the initial memory", "rmt_deploy/runtime/session.py",
          "track = self._new_track(old.key, {name: array[row]\n"
          "                                              for name, array in state.items()})",
          "track = self._new_track(old.key, self.model.initial_state)",
          ("tests/test_session.py::test_state_restores_mid_word_and_mid_character",)),
    Fault("the stepper ignoring the order of resident rows", "rmt_deploy/runtime/stepper.py",
          "return self._state, np.array([position[key] for key in self._rows])",
          "return self._state, None",
          ("tests/runtime/test_stepper.py::test_rows_in_another_order_are_permuted_not_reloaded",
           "tests/test_session.py::test_pool_sessions_from_threads_equal_one_by_one")),
    Fault("decoder padding attended (segmentation's mask over the pad tokens)",
          "rmt_deploy/segmentation.py",
          "        mask[row, : len(tokens)] = 1\n", "        mask[row, :] = 1\n",
          ("tests/runtime/test_runtime.py::test_decoder_batch_perplexities_equal_single_runs",)),
)


def copy_tree(target: Path) -> None:
    """The package, the tests and the pytest configuration, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("rmt_deploy", "tests"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")


def apply(fault: Fault, target: Path) -> None:
    path = target / fault.file
    text = path.read_text()
    if text.count(fault.old) != 1:
        raise SystemExit(f"mutate.py: {fault.file} holds {text.count(fault.old)} copies of "
                         f"the code of fault {fault.name!r} (expected 1); update FAULTS")
    path.write_text(text.replace(fault.old, fault.new))


def run_tests(target: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, str, float]:
    """Whether the tests pass in ``target``, the first failure, and the seconds taken."""
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONDONTWRITEBYTECODE": "1"}
    check = subprocess.run([sys.executable, "-c", "import rmt_deploy; print(rmt_deploy.__file__)"],
                           cwd=target, env=env, capture_output=True, text=True, check=True)
    if not check.stdout.startswith(str(target)):
        raise SystemExit(f"mutate.py: the copy imports {check.stdout.strip()}, not its own "
                         "package")
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                 "no:cacheprovider", *tests], cwd=target, env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - started
    seconds = time.perf_counter() - started
    lines = result.stdout.splitlines()
    failed = [line.split(" - ")[0] for line in lines if re.match(r"(FAILED|ERROR) ", line)]
    why = [line[1:].strip() for line in lines if line.startswith("E ")]
    first = (failed or lines[-1:] or [""])[0] + (f"\n      {why[0][:150]}" if why else "")
    return result.returncode == 0, first, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="WORD",
                        help="Only the faults whose name holds one of these words.")
    parser.add_argument("--no-baseline", action="store_true",
                        help="Skip the run of the tests on the unchanged copy.")
    parser.add_argument("--timeout", type=int, default=900, help="Seconds per fault.")
    args = parser.parse_args()
    faults = [f for f in FAULTS if not args.only or any(w in f.name for w in args.only)]
    all_tests = tuple(dict.fromkeys(test for fault in faults for test in fault.tests))
    missed = 0
    with tempfile.TemporaryDirectory(prefix="rmt-mutate-") as temp:
        if not args.no_baseline:
            clean = Path(temp) / "baseline"
            copy_tree(clean)
            passed, first, seconds = run_tests(clean, all_tests, args.timeout * 2)
            print(f"baseline (no fault): {'pass' if passed else 'FAIL: ' + first} "
                  f"({len(all_tests)} tests, {seconds:.0f} s)", flush=True)
            if not passed:
                return 1
        for index, fault in enumerate(faults):
            target = Path(temp) / f"fault-{index}"
            copy_tree(target)
            apply(fault, target)
            passed, first, seconds = run_tests(target, fault.tests, args.timeout)
            verdict = "MISSED (the tests still pass)" if passed else f"caught: {first}"
            missed += passed
            print(f"{fault.name}\n    {fault.file}\n    {verdict} ({seconds:.0f} s)",
                  flush=True)
            shutil.rmtree(target)
    print(f"{len(faults) - missed} of {len(faults)} faults caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
