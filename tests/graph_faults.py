"""Damaged copies of ONNX graphs and engines, the faults the validation gates must catch:
one weight changed by 1%, a NaN weight, a state output written off by a factor,
memory that is not fed back, NaN outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rmt_deploy.runtime.backends.base import EngineState, StepEngine


def largest_weight(model) -> int:
    """Index of the largest floating-point matrix among a graph's initializers."""
    from onnx import numpy_helper

    sizes = [(numpy_helper.to_array(t).size if len(t.dims) == 2 else 0, i)
             for i, t in enumerate(model.graph.initializer)
             if numpy_helper.to_array(t).dtype.kind == "f"]
    return max(sizes)[1]


def damaged_graph(source: str | Path, target: str | Path, fault: str = "scale") -> Path:
    """``source`` with its largest weight matrix scaled by 1.01 (``"scale"``) or with one
    of its values NaN (``"nan"``), saved as ``target``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    index = largest_weight(model)
    tensor = model.graph.initializer[index]
    weight = numpy_helper.to_array(tensor).copy()
    if fault == "scale":
        weight *= weight.dtype.type(1.01)
    else:
        weight.flat[0] = np.nan
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(weight, tensor.name))
    onnx.save(model, str(target))
    return Path(target)


def damaged_output(source: str | Path, target: str | Path, output: str,
                   scale: float = 1.01) -> Path:
    """``source`` whose graph output ``output`` (a state output such as an armt's
    ``A_out.1``) is its sound value times ``scale``, saved as ``target``: a graph that
    writes one state pair wrong and computes everything else as before."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    sound = f"{output}.sound"
    producers = [node for node in model.graph.node if output in node.output]
    assert len(producers) == 1, f"{output} is not produced by one node"
    node = producers[0]
    node.output[list(node.output).index(output)] = sound
    factor = f"{output}.scale"
    model.graph.initializer.append(numpy_helper.from_array(np.float32(scale), factor))
    model.graph.node.append(helper.make_node("Mul", [sound, factor], [output],
                                             name=f"{output}.damage"))
    onnx.save(model, str(target))
    return Path(target)


def half_state(source: str | Path, target: str | Path, name: str) -> Path:
    """``source`` whose state input ``name`` and its output (``name``'s pair) are FP16 at
    the graph's boundary, cast to and from FP32 inside: the network a TensorRT parser
    would type FP16 there; saved as ``target``."""
    import onnx
    from onnx import TensorProto, helper

    from rmt_deploy.contract import state_pairs
    from rmt_deploy.manifest import read_manifest

    config = read_manifest(Path(source).parent).config
    output = next(p.name_out for p in state_pairs(config) if p.name_in == name)
    model = onnx.load(str(source))
    inside_in, inside_out = f"{name}.fp32", f"{output}.fp32"
    for node in model.graph.node:
        node.input[:] = [inside_in if i == name else i for i in node.input]
        node.output[:] = [inside_out if o == output else o for o in node.output]
    for value, kind in ((model.graph.input, name), (model.graph.output, output)):
        next(v for v in value if v.name == kind).type.tensor_type.elem_type = \
            TensorProto.FLOAT16
    model.graph.node.insert(0, helper.make_node("Cast", [name], [inside_in],
                                                to=TensorProto.FLOAT))
    model.graph.node.append(helper.make_node("Cast", [inside_out], [output],
                                             to=TensorProto.FLOAT16))
    onnx.save(model, str(target))
    return Path(target)


class FaultyEngine(StepEngine):
    """A real engine whose steps are damaged: ``"no_feedback"`` steps every segment from
    the memory it was last given; ``"nan"`` makes one logit NaN from ``segment`` on;
    ``"drift"`` adds ``size`` times the steps since the memory was last given to the
    memory after each step (an error that compounds while the memory is fed back);
    ``"rotate"`` reverses the order of the memory slots after ``segment`` steps (the
    values stay, each slot's cosine falls); ``"flip"`` rolls the logits' last axis by one
    (every prediction changes); ``"offset"`` adds ``size`` to one ``output`` (the logits or
    any state output: the memory, an armt's ``A_out.0``) after ``segment`` steps.
    Steps are counted per engine state: a batch whose rows change gets a new one."""

    def __init__(self, engine: StepEngine, fault: str, segment: int = 0,
                 size: float = 0.0, output: str = "logits") -> None:
        self.engine, self.fault, self.segment, self.size = engine, fault, segment, size
        self.output = output
        self.config, self.name, self.graphs = engine.config, engine.name, engine.graphs
        self.precision = engine.precision

    def new_state(self, state) -> _FaultyState:
        return _FaultyState(self, self.engine.new_state(state), state)


class _FaultyState(EngineState):
    def __init__(self, owner: FaultyEngine, state: EngineState, first) -> None:
        super().__init__(state.batch)
        self.owner, self.inner, self.first = owner, state, dict(first)
        self.steps = 0
        self.since_load = 0

    def load(self, state):
        self.first = dict(state)
        self.since_load = 0
        self.inner.load(state)

    def state(self):
        return self.inner.state()

    def _load_memory(self, memory):
        self.inner.load({**self.inner.state(), "memory_in": memory})

    def _offset_state(self, output: str, size: float) -> None:
        """Add ``size`` to the state that ``output`` writes (``memory_out``, an armt's
        ``A_out.0``, ...), as if the graph wrote it wrong."""
        from rmt_deploy.contract import state_pairs

        name = next(p.name_in for p in state_pairs(self.owner.config) if p.name_out == output)
        state = self.inner.state()
        self.inner.load({**state, name: state[name] + np.float32(size)})

    def step(self, input_ids, attention_mask, logits=True):
        owner = self.owner
        if owner.fault == "no_feedback":
            self.inner.load(self.first)
        result = self.inner.step(input_ids, attention_mask, logits)
        self.steps += 1
        self.since_load += 1
        late = self.steps > owner.segment
        if owner.fault == "drift":
            self._load_memory(self.inner.state()["memory_in"]
                              + np.float32(owner.size * self.since_load))
        if owner.fault == "rotate" and late:
            self._load_memory(self.inner.state()["memory_in"][:, ::-1].copy())
        if owner.fault == "offset" and late and owner.output != "logits":
            self._offset_state(owner.output, owner.size)
        if owner.fault == "offset" and late and owner.output == "logits" and result is not None:
            result = result + np.float32(owner.size)
        if result is not None and late and owner.fault == "nan":
            result = result.copy()
            result.flat[0] = np.nan
        if result is not None and owner.fault == "flip":
            result = np.roll(result, 1, axis=-1)
        return result

    def prefill(self, input_ids, attention_mask, capacity=None):
        return self.inner.prefill(input_ids, attention_mask, capacity)

    def decode(self, cache, input_ids, attention_mask):
        return self.inner.decode(cache, input_ids, attention_mask)

    def close(self):
        self.inner.close()
        super().close()
