"""Checkpoint formats, all read without executing code from the file.

- ``rmt-deploy``: the project's own self-describing checkpoint (``.pt`` or
  ``.safetensors``): RMT config, base model config, weights and tokenizer.
- ``authors-bert``: the 1M-token paper's ``model_best.pth`` (``model_state_dict``), with
  the base model's Hugging Face folder given separately.
- ``authors-gpt2``: BABILong's ``pytorch_model.bin`` (``memory_cell.*`` keys), with the
  base model's folder given separately; also the published plain RMT on a Llama base,
  with or without peft LoRA (merged at load).
- ``authors-armt``: the published ARMT wrapper (``model.safetensors``, per-layer memory
  maps, peft LoRA), read by ``armt_checkpoint`` and built by ``armt_from_base``.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmt_deploy.errors import CheckpointError, ConfigError
from rmt_deploy.files import atomic_path, sha256_file
from rmt_deploy.model.armt import ARMT, AssociativeMaps
from rmt_deploy.model.armt_checkpoint import (
    LoraMerge,
    is_published,
    read_published,
    read_wrapper_config,
    recorded_segment_size,
)
from rmt_deploy.model.base import build_decoder_base, build_encoder_base, hf_config
from rmt_deploy.model.decoder import DecoderRMT
from rmt_deploy.model.encoder import EncoderRMT
from rmt_deploy.model.factory import (
    SpecialTokens,
    armt_from_base,
    decoder_from_base,
    encoder_from_base,
)
from rmt_deploy.spec import PAPER_LABELS, RMTConfig

FORMAT_NAME = "rmt-deploy"
FORMAT_VERSION = 1
OWN, AUTHORS_BERT, AUTHORS_GPT2 = "rmt-deploy", "authors-bert", "authors-gpt2"
AUTHORS_ARMT = "authors-armt"
#: Tokens per segment of an authors' decoder whose segment size nothing records.
DEFAULT_SEGMENT_SIZE = 512

#: Buffers that some transformers versions save and that carry no weights.
_STATELESS_SUFFIXES = (".position_ids", ".token_type_ids", ".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class AuthorsOptions:
    """What an authors' checkpoint does not record, given by the user."""

    base_model: Path | None = None  # Hugging Face folder: config.json + tokenizer files
    input_size: int = 512  # encoder: positions per segment
    segment_size: int | None = None  # decoder: tokens per segment [config.json, else 512]
    labels: tuple[str, ...] = PAPER_LABELS  # encoder: class names in logit order
    lora_alpha: float | None = None  # LoRA's scale numerator; required if LoRA is present
    armt_correction: bool = True  # ARMT: the authors' class default
    sliding_window: bool = False  # ARMT: attend to the previous segment too


@dataclass
class LoadedCheckpoint:
    rmt: EncoderRMT | DecoderRMT | ARMT
    tokenizer_json: str | None  # tokenizers' serialization, None if the file has none
    base_config: dict[str, Any]  # the base model's transformers config, as a dict
    format: str  # OWN, AUTHORS_BERT, AUTHORS_GPT2 or AUTHORS_ARMT
    sha256: str  # of the checkpoint file
    lora: LoraMerge | None = None  # the LoRA merged into the base weights at load


def load_checkpoint(path: str | Path, options: AuthorsOptions | None = None) -> LoadedCheckpoint:
    """Read any supported checkpoint into an RMT in eval mode."""
    path = Path(path)
    options = options or AuthorsOptions()
    if path.suffix == ".safetensors":
        payload = _read_safetensors(path)
        if payload.get("format") != FORMAT_NAME:  # a plain state dict: the authors' layouts
            payload = payload["state_dict"]
    else:
        payload = _read_torch(path)
    kind = _detect_format(path, payload)
    lora = None
    if kind == OWN:
        _refuse_recorded_options(path, options)
        rmt, tokenizer_json, base_config = _from_own(path, payload)
    elif kind == AUTHORS_BERT:
        rmt, tokenizer_json, base_config = _from_authors_bert(path, payload, options)
    elif kind == AUTHORS_ARMT:
        rmt, tokenizer_json, base_config, lora = _from_authors_armt(path, payload, options)
    else:
        rmt, tokenizer_json, base_config, lora = _from_authors_gpt2(path, payload, options)
    return LoadedCheckpoint(rmt.eval(), tokenizer_json, base_config, kind, sha256_file(path),
                            lora)


def save_checkpoint(
    rmt: EncoderRMT | DecoderRMT | ARMT,
    path: str | Path,
    tokenizer_json: str | None,
) -> Path:
    """Write the project's own checkpoint atomically (``.safetensors`` or torch zip)."""
    path = Path(path)
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "rmt_config": json.dumps(rmt.rmt_config.to_dict()),
        "base_config": json.dumps(rmt.model.config.to_dict()),
        "tokenizer": tokenizer_json or "",
    }
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in rmt.state_dict().items()}
    with atomic_path(path) as temp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(weights, str(temp), metadata=meta)
        else:
            torch.save({**meta, "state_dict": weights}, temp)
    return path


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the checkpoint path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty; re-save or re-download the checkpoint")


def _read_torch(path: Path) -> Any:
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is many lines of advice; keep only what the file asked for.
        refused = re.search(r"GLOBAL \S+|Can only [^`.]+|unrecognized function", str(error))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: the file holds objects other than tensors and plain "
                f"data ({refused.group(0)[:120]}); only weights-only checkpoints are read, "
                "never code"
            ) from None
        detail = re.search(r"Unsupported operand \d+|String is too long", str(error))
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): bad pickle "
            f"data{f' ({detail.group(0)})' if detail else ''}"
        ) from None
    except Exception as error:  # arbitrary bytes fail in arbitrary ways (KeyError, ...)
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}{f': {first}' if first else ''}"
        ) from None


def _read_safetensors(path: Path) -> dict[str, Any]:
    _check_file(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
    return {**meta, "state_dict": weights}


def _detect_format(path: Path, payload: Any) -> str:
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(payload).__name__}, not a dict of weights; expected an "
            "rmt-deploy checkpoint or an authors' model_best.pth / pytorch_model.bin"
        )
    if payload.get("format") == FORMAT_NAME:
        return OWN
    if "model_state_dict" in payload:
        return AUTHORS_BERT
    if any(str(key).startswith("memory_cell.") for key in payload):
        return AUTHORS_ARMT if any(".W_m" in str(key) for key in payload) else AUTHORS_GPT2
    keys = ", ".join(sorted(map(str, payload))[:6]) or "none"
    raise CheckpointError(
        f"{path}: unrecognized checkpoint layout (top-level keys: {keys}); expected an "
        "rmt-deploy checkpoint, an authors' BERT model_best.pth with 'model_state_dict', "
        "or an authors' GPT-2 pytorch_model.bin or Llama RMT / ARMT model.safetensors with "
        "'memory_cell.*' keys"
    )


#: Whether each model-changing option was given (it differs from its default).
_GIVEN: dict[str, Callable[[AuthorsOptions], bool]] = {
    "--lora-alpha": lambda options: options.lora_alpha is not None,
    "--no-armt-correction": lambda options: not options.armt_correction,
    "--sliding-window": lambda options: options.sliding_window,
}


def _given(options: AuthorsOptions, *names: str) -> list[str]:
    """Those of the options ``names`` that were given."""
    return [name for name in names if _GIVEN[name](options)]


def _refuse_recorded_options(path: Path, options: AuthorsOptions) -> None:
    """An rmt-deploy checkpoint records its model (LoRA merged, correction, window): an
    option that would change them is refused, not silently ignored."""
    given = _given(options, "--lora-alpha", "--no-armt-correction", "--sliding-window")
    if given:
        raise CheckpointError(f"{path}: an rmt-deploy checkpoint records its model (LoRA "
                              f"merged, correction, window), so {' and '.join(given)} "
                              "cannot change it; leave them out")


def _from_own(path: Path, payload: Mapping[str, Any]):
    version = str(payload.get("format_version"))
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: rmt-deploy checkpoint format version {version} is not supported "
            f"(this rmt-deploy reads version {FORMAT_VERSION}); upgrade rmt-deploy"
        )
    try:
        config = RMTConfig.from_dict(json.loads(payload["rmt_config"]))
        base_config = json.loads(payload["base_config"])
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: damaged rmt-deploy header ({error})") from None
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    weights = payload.get("state_dict")
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: rmt-deploy checkpoint has no 'state_dict'")
    hf = hf_config(base_config)
    if config.is_encoder:
        rmt: EncoderRMT | DecoderRMT | ARMT = EncoderRMT(build_encoder_base(hf), config)
    elif config.is_armt:
        maps = [AssociativeMaps(config.hidden_size, config.d_mem)
                for _ in range(hf.num_hidden_layers)]
        memory = torch.zeros(config.num_mem_tokens, config.hidden_size)
        rmt = ARMT(build_decoder_base(hf), config, memory, maps)
    else:
        memory = torch.zeros(config.num_mem_tokens, config.hidden_size)
        rmt = DecoderRMT(build_decoder_base(hf), config, memory)
    _load_weights(path, rmt, weights, ignore=lambda key: False)
    return rmt, payload.get("tokenizer") or None, base_config


def _from_authors_bert(path: Path, payload: Mapping[str, Any], options: AuthorsOptions):
    weights = payload["model_state_dict"]
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a dict of weights")
    _require_tensors(path, weights)
    hf, tokenizer = _base_folder(path, options, "BERT model_best.pth")
    special = _special_tokens(tokenizer)
    if "mem_token_ids" in weights:
        num_mem_tokens = int(weights["mem_token_ids"].numel())
    else:
        embeddings = [v for k, v in weights.items() if k.endswith("word_embeddings.weight")]
        if not embeddings:
            raise CheckpointError(f"{path}: no word embeddings found (missing keys "
                                  "'mem_token_ids' and '*.word_embeddings.weight')")
        num_mem_tokens = embeddings[0].shape[0] - hf.vocab_size
    for name, expected in (("cls_token", special.cls), ("sep_token", special.sep)):
        found = weights[name].reshape(-1).tolist() if name in weights else [expected]
        if found != [expected]:
            raise CheckpointError(
                f"{path}: the checkpoint's {name} id {found[0] if len(found) == 1 else found} "
                f"differs from the tokenizer's ({expected}); --base-model must be the model it "
                "was trained from"
            )
    classifier = [v for k, v in weights.items() if "classifier" in k and k.endswith("weight")]
    if classifier and classifier[-1].shape[0] != len(options.labels):
        raise CheckpointError(
            f"{path}: the classifier has {classifier[-1].shape[0]} outputs but "
            f"{len(options.labels)} labels were given; pass --labels with "
            f"{classifier[-1].shape[0]} comma-separated names"
        )
    hf.num_labels = len(options.labels)
    try:
        rmt = encoder_from_base(
            build_encoder_base(hf), num_mem_tokens=num_mem_tokens,
            input_size=options.input_size, labels=options.labels, special=special,
        )
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    aliases = {"cls_token", "sep_token", "mem_token_ids", "model.embeddings.weight"}
    _load_weights(path, rmt, weights, ignore=lambda key: key in aliases)
    return rmt, tokenizer.backend_tokenizer.to_str(), rmt.model.config.to_dict()


def _from_authors_gpt2(path: Path, payload: Mapping[str, Any], options: AuthorsOptions):
    weights, lora, segment_size = _memory_cell(path, payload, options)
    if "memory" not in weights:
        raise CheckpointError(f"{path}: missing key memory_cell.memory (the learned memory)")
    hf, tokenizer = _base_folder(path, options, "RMT MemoryCell checkpoint")
    memory = weights["memory"]
    if memory.dim() != 2:
        raise CheckpointError(f"{path}: memory_cell.memory has shape {tuple(memory.shape)}, "
                              "expected [num_mem_tokens, hidden]")
    try:
        rmt = decoder_from_base(
            build_decoder_base(hf), num_mem_tokens=memory.shape[0],
            segment_size=segment_size, special=_special_tokens(tokenizer),
            memory=torch.zeros(memory.shape[0], hf.hidden_size),
        )
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    _load_weights(path, rmt, weights, ignore=lambda key: False)
    return rmt, tokenizer.backend_tokenizer.to_str(), rmt.model.config.to_dict(), lora


def _memory_cell(path: Path, payload: Mapping[str, Any], options: AuthorsOptions):
    """A ``MemoryCell``'s weights under DecoderRMT's names (a published Llama one's LoRA
    merged), the LoRA merged and the segment size."""
    strays = [str(key) for key in payload if not str(key).startswith("memory_cell.")]
    if strays:
        raise CheckpointError(f"{path}: unexpected keys beside memory_cell.*: "
                              f"{_few(strays)}")
    _require_tensors(path, payload)
    armt_only = _given(options, "--no-armt-correction", "--sliding-window")
    if armt_only:
        raise CheckpointError(f"{path}: {' and '.join(armt_only)} apply to ARMT checkpoints "
                              "only, and this one is a plain RMT MemoryCell; leave them out")
    if not is_published(list(payload)):
        if options.lora_alpha is not None:
            raise CheckpointError(f"{path}: --lora-alpha was given but the checkpoint holds "
                                  "no LoRA weights (lora_A.default); leave it out")
        weights = {key[len("memory_cell."):]: value for key, value in payload.items()}
        return weights, None, _segment_size(options, read_wrapper_config(path))
    published = read_published(path, payload, options.lora_alpha)
    weights = {"memory": published.memory,
               **{f"model.{key}": value for key, value in published.base_state.items()}}
    return weights, published.lora, _segment_size(options, published.wrapper_config)


def _from_authors_armt(path: Path, payload: Mapping[str, Any], options: AuthorsOptions):
    _require_tensors(path, payload)
    published = read_published(path, payload, options.lora_alpha)
    hf, tokenizer = _base_folder(path, options, "ARMT model.safetensors")
    base = build_decoder_base(hf)
    _load_weights(path, base, published.base_state, ignore=lambda key: False)
    try:
        rmt = armt_from_base(
            base, num_mem_tokens=published.num_mem_tokens, d_mem=published.d_mem,
            segment_size=_segment_size(options, published.wrapper_config),
            correction=options.armt_correction, special=_special_tokens(tokenizer),
            memory=published.memory, maps=published.maps, sliding_window=options.sliding_window)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return rmt, tokenizer.backend_tokenizer.to_str(), base.config.to_dict(), published.lora


def _segment_size(options: AuthorsOptions, wrapper_config: Mapping[str, Any]) -> int:
    """--segment-size, else the wrapper config's (config.json beside), else the default."""
    if options.segment_size is not None:
        return options.segment_size
    recorded = recorded_segment_size(wrapper_config)
    return recorded if recorded is not None else DEFAULT_SEGMENT_SIZE


def _base_folder(path: Path, options: AuthorsOptions, what: str):
    folder = options.base_model
    if folder is None:
        raise CheckpointError(
            f"{path}: an authors' {what} does not record its base model; pass "
            "--base-model DIR (a Hugging Face folder with config.json and tokenizer files)"
        )
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"--base-model {folder}: no config.json there; pass the "
                              "Hugging Face folder of the base model")
    import transformers

    try:
        hf = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"--base-model {folder}: cannot read it: {first[:160]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"--base-model {folder}: needs a fast tokenizer (tokenizer.json "
                              "or vocab files that transformers converts)")
    return hf, tokenizer


def _special_tokens(tokenizer) -> SpecialTokens:
    return SpecialTokens(
        pad=tokenizer.pad_token_id, cls=tokenizer.cls_token_id, sep=tokenizer.sep_token_id,
        eos=tokenizer.eos_token_id, bos=tokenizer.bos_token_id,
    )


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _require_tensors(path: Path, weights: Mapping[str, Any]) -> None:
    bad_values = [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise CheckpointError(f"{path}: entries that are not tensors: {_few(bad_values)}")


def _load_weights(
    path: Path, module: nn.Module, weights: Mapping[str, Any], ignore: Callable[[str], bool]
) -> None:
    """Strict load that names every missing, unexpected or misshapen key."""
    expected = module.state_dict()
    given = {
        str(k): v for k, v in weights.items()
        if not ignore(str(k)) and not str(k).endswith(_STATELESS_SUFFIXES)
    }
    _require_tensors(path, given)
    missing = [k for group in _tied_groups(module) if not any(k in given for k in group)
               for k in group[:1]]
    unexpected = [k for k in given if k not in expected]
    misshapen = [
        f"{k} (file {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in given if k in expected and given[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if misshapen:
        problems.append(f"wrong shapes {_few(misshapen, 3)}")
    if problems:
        raise CheckpointError(
            f"{path}: weights do not match the model: {'; '.join(problems)}; check that "
            "the checkpoint, --base-model and the size options belong together"
        )
    module.load_state_dict(given, strict=False)


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """The module's keys grouped by tensor: a tied one (e.g. an LM head that is the input
    embedding) is loaded from any of its names."""
    groups: dict[int, list[str]] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(key)
    return list(groups.values())
