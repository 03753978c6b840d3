"""One prepared check for a machine with an NVIDIA GPU: prints one JSON report.

- Where TensorRT imports: builds plans for the demo model and a MiniLM-L6-size model,
  checks closed-loop parity of the TensorRT backend against ONNX Runtime over 1,000
  segments, the demo accuracy at 1x and 1,000x its training length, and segments/s.
- Always (CUDA PyTorch): closed-loop drift of the PyTorch reference in FP16 on the GPU
  against FP32 over 1,000 segments, and the demo accuracy in FP16 at 1,000x.

Usage: python benchmarks/gpu_check.py [--samples 50]   (see scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmarks import INPUT_SIZE, minilm_authors_checkpoint  # noqa: E402

from rmt_deploy.demo.evaluate import accuracy  # noqa: E402
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from rmt_deploy.export.validate import compare  # noqa: E402
from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint  # noqa: E402
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from rmt_deploy.runtime.backends.torch import TorchEngine  # noqa: E402
from rmt_deploy.runtime.model import RMTModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo-rmt.pt"
SEGMENTS = 1000


def torch_fp16_drift(checkpoint: Path, options: AuthorsOptions) -> dict:
    reference = TorchEngine(load_checkpoint(checkpoint, options).rmt)
    candidate = TorchEngine(load_checkpoint(checkpoint, options).rmt, device="cuda", half=True)
    started = time.perf_counter()
    result = compare(reference, candidate, reference.initial_memory(), SEGMENTS)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def segments_per_second(model: RMTModel, batch: int, segments: int = 200) -> float:
    size = model.config.segment_size
    docs = [np.random.default_rng(i).integers(10, 200, segments * size) for i in range(batch)]
    model.run([d[: 4 * size] for d in docs])  # warm-up
    started = time.perf_counter()
    model.run(docs)
    return batch * segments / (time.perf_counter() - started)


def tensorrt_checks(folder: Path, checkpoint: Path, options: AuthorsOptions,
                    samples: int, demo: bool) -> dict:
    from rmt_deploy.contract import BatchProfile
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines
    from rmt_deploy.runtime import open_model
    from rmt_deploy.runtime.backends.tensorrt import TensorRTEngine

    export = export_checkpoint(checkpoint, folder, ExportOptions(authors=options))
    manifest = build_engines(export.folder, EngineOptions(batch=BatchProfile(1, 8, 8),
                                                          timing_cache=folder.parent / "tc"))
    report = {"engines": manifest.engines}
    reference = OnnxRuntimeEngine(manifest)
    report["parity_vs_onnxruntime"] = compare(reference, TensorRTEngine(manifest),
                                              manifest.load_initial_memory(), SEGMENTS)
    for graphs in (False, True):
        model = open_model(export.folder, backend="tensorrt", cuda_graphs=graphs)
        key = "segments_per_second" + ("_cuda_graphs" if graphs else "")
        report[key] = {batch: segments_per_second(model, batch) for batch in (1, 8)}
    if demo:
        model = open_model(export.folder, backend="tensorrt")
        trained = model.config.extra["train_segments"]
        report["accuracy"] = {f"{factor}x": accuracy(model, factor * trained, samples, seed=7)
                              for factor in (1, 1000)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__,
                    "tensorrt": importlib.util.find_spec("tensorrt") is not None}
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device visible to PyTorch"
        print(json.dumps(report, indent=2))
        sys.exit(1)
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        minilm, base = minilm_authors_checkpoint(folder)
        minilm_options = AuthorsOptions(base_model=base, input_size=INPUT_SIZE)
        report["torch_fp16_drift"] = {"demo": torch_fp16_drift(DEMO, AuthorsOptions()),
                                      "minilm": torch_fp16_drift(minilm, minilm_options)}
        fp16 = TorchEngine(load_checkpoint(DEMO).rmt, device="cuda", half=True)
        model = RMTModel(fp16, fp16.initial_memory())
        trained = model.config.extra["train_segments"]
        report["torch_fp16_demo_accuracy"] = {
            f"{factor}x": accuracy(model, factor * trained, args.samples, seed=7)
            for factor in (1, 1000)}
        if report["tensorrt"]:
            report["tensorrt_demo"] = tensorrt_checks(folder / "demo", DEMO, AuthorsOptions(),
                                                      args.samples, demo=True)
            report["tensorrt_minilm"] = tensorrt_checks(folder / "minilm", minilm,
                                                        minilm_options, args.samples, demo=False)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
