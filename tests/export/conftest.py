"""Fixtures of the export tests: a tiny random Llama with a byte-level tokenizer, and SmolLM2-135M trained a few steps.

"Training" is a few manual AdamW steps on ``lora_B`` plus ``proxy_update`` (no trainer), ending with one step whose
``B`` is left pending, so the export's flush has work to do.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from falqon_lit import FalqonConfig, InitMethod, convert_model, falqon_layers

TINY_VOCAB = 272  # 256 bytes + 2 specials, padded to a multiple of 16


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run export tests on one intra-op thread: on a busy 2-core host, OpenMP spin-waiting across oversubscribed
    threads made tiny-model forwards ~10x slower (measured 44 s vs 3.7 s for one tiny hf export + verification)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 256 byte tokens plus <bos>/<eos>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<bos>": 256, "<eos>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def train_a_few_steps(model: torch.nn.Module, batches: list[torch.Tensor], lr: float, k: int) -> None:
    """AdamW on every lora_B, a row-wise proxy update after each step but the last (its B stays pending)."""
    layers = falqon_layers(model)
    optimizer = torch.optim.AdamW([layer.lora_B for layer in layers.values()], lr=lr)
    model.train()
    for step, ids in enumerate(batches):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step < len(batches) - 1:
            for layer in layers.values():
                layer.proxy_update(k)
    model.eval()


def make_tiny(
    weight_scaling: str, act_scaling: str, seed: int = 0, bf16_exact: bool = True, group_projections: bool = True
):
    """A trained tiny Llama (hidden 64, 2 layers) and its byte tokenizer.

    ``bf16_exact`` rounds the high-precision weights to bf16 values first (as bf16 training keeps them), so the
    bf16 export of embeddings/norms/lm_head is lossless and only the FP8 path is under test. ``group_projections``
    as in ``convert_model`` (grouped tensor-scaled shards share one scale).
    """
    torch.manual_seed(seed)
    model = tiny_llama(
        vocab_size=TINY_VOCAB, max_position_embeddings=128, bos_token_id=256, eos_token_id=257, pad_token_id=257
    )
    if bf16_exact:
        for param in model.parameters():
            param.data = param.data.bfloat16().float()
    # SVD init: no fit runs here to calibrate the default GRADIENT's A, and the tensor-scale tests want A's rows
    # below W's range (a random A would set the shared scale).
    config = FalqonConfig(rank=16, weight_scaling=weight_scaling, act_scaling=act_scaling, init=InitMethod.SVD)
    convert_model(model, config, group_projections=group_projections)
    batches = [torch.randint(0, 256, (2, 16)) for _ in range(4)]
    train_a_few_steps(model, batches, lr=5e-2, k=16)
    return model, byte_tokenizer()


@pytest.fixture(params=[("tensor", "tensor"), ("row", "row")], ids=["tensor", "row"])
def tiny(request):
    """(model, tokenizer, granularity) for both scale granularities."""
    model, tokenizer = make_tiny(*request.param)
    return model, tokenizer, request.param[0]


@pytest.fixture(scope="session")
def smollm2_trained():
    """SmolLM2-135M-Instruct converted (row weight scales, per-token activations) and trained 3 steps; built once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # built before the module-scoped thread fixture; see _one_torch_thread
    try:
        return _build_smollm2()
    finally:
        torch.set_num_threads(threads)


def _build_smollm2():
    # No skip when the packaged model is missing: the README's set-up installs it, so its absence is a failure.
    from falqon_lit.assets import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)
    for param in model.parameters():  # bf16 master weights, so the bf16 export of the rest is lossless
        param.data = param.data.bfloat16().float()
    torch.manual_seed(0)
    # Random A init: the SVD init of 210 layers costs minutes on 2 cores and is not what export tests are about.
    convert_model(model, FalqonConfig.from_recipe("fp8-row", init=InitMethod.RANDOM))
    initial = {name: layer.weight_fp8.clone() for name, layer in falqon_layers(model).items()}
    texts = ["The capital of France is Paris, a city on the Seine.", "def add(a, b):\n    return a + b\n"]
    batches = [tokenizer(texts[i % 2], return_tensors="pt").input_ids for i in range(3)]
    train_a_few_steps(model, batches, lr=2e-3, k=16)
    return model, tokenizer, initial


@pytest.fixture
def byte_tok() -> PreTrainedTokenizerFast:
    """A fresh :func:`byte_tokenizer`."""
    return byte_tokenizer()


@pytest.fixture
def tiny_factory():
    """``make_tiny`` itself, for tests that need a specific granularity or several models."""
    return make_tiny
