"""The fused block switch: grouped projections everywhere, Liger Kernel's block and fused loss on CUDA only."""

from __future__ import annotations

import importlib.util

import pytest
import reference
import torch
from fp8_devices import requires_cuda_fp8
from tiny_models import tiny_llama

from falqon_lit.config import FalqonConfig
from falqon_lit.convert import convert_model
from falqon_lit.fused_block import fused_linear_cross_entropy, liger_missing
from falqon_lit.grouped import projection_groups
from falqon_lit.module import IGNORE_INDEX

requires_liger = pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel (pip install 'falqon-lit[gpu]')"
)


def _batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh tokens each run
    ids = torch.randint(0, 256, (3, 10), generator=gen)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt that is not trained
    labels[2, 7:] = IGNORE_INDEX  # padding
    return {k: v.to(device) for k, v in {"input_ids": ids, "labels": labels}.items()}


def _logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = batch["labels"][:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX), logits.argmax(-1), targets


def test_fused_linear_cross_entropy_shifts_and_masks_as_the_logits_path():
    torch.manual_seed(0)
    model = tiny_llama()
    convert_model(model, FalqonConfig(rank=16))
    batch = _batch()
    got = fused_linear_cross_entropy(model, batch["input_ids"], None, None, batch["labels"], IGNORE_INDEX,
                                     linear_ce=reference.linear_cross_entropy)  # fmt: skip
    want = _logits_loss(model, batch)
    assert torch.equal(got[2], want[2])
    assert torch.allclose(got[0], want[0], rtol=1e-6, atol=0)  # the same float32 logits rows, summed alike
    trained = want[2] != IGNORE_INDEX
    assert torch.equal(got[1][trained], want[1][trained])


def test_liger_missing_says_why_on_cpu_and_for_unknown_families():
    model = tiny_llama()
    assert "needs CUDA" in liger_missing(model, torch.device("cpu"))
    model.config.model_type = "gpt2"
    if torch.cuda.is_available() and importlib.util.find_spec("liger_kernel"):
        assert "is not one of" in liger_missing(model, torch.device("cuda"))


@pytest.mark.parametrize("fused_block", [True, False])
def test_module_fused_block_switch_on_cpu(tiny_trainer_parts, fused_block):
    module, _ = tiny_trainer_parts({"fused_block": fused_block})
    module.configure_model()
    assert module.fused_loss is False  # no CUDA here: the loss comes from the logits, unfused
    assert bool(projection_groups(module.model)) is fused_block
    assert bool(module.conversion.grouped) is fused_block


@pytest.mark.gpu
@requires_cuda_fp8
@requires_liger
def test_liger_block_and_loss_match_the_unfused_path_on_cuda():
    from falqon_lit.fused_block import apply_liger_block

    torch.manual_seed(0)
    fused, plain = tiny_llama().cuda().bfloat16(), tiny_llama().cuda().bfloat16()
    plain.load_state_dict(fused.state_dict())
    for model in (fused, plain):
        torch.manual_seed(1)
        convert_model(model, FalqonConfig(rank=16))
    with torch.no_grad():
        for p_f, p_p in zip(fused.parameters(), plain.parameters(), strict=True):
            if p_f.requires_grad:
                p_f.normal_(0, 0.02)
                p_p.copy_(p_f)
    apply_liger_block(fused)
    batch = _batch("cuda")
    ids, labels = batch["input_ids"], batch["labels"]
    loss, preds, targets = fused_linear_cross_entropy(fused, ids, None, None, labels, IGNORE_INDEX)
    want_loss, want_preds, want_targets = _logits_loss(plain, batch)
    loss.backward()
    want_loss.backward()
    assert torch.equal(targets, want_targets)
    # bf16 activations: Liger's norm/rotary/SwiGLU kernels round differently from the eager ops; FP8 inputs amplify
    # a last-bit difference into one FP8 step (~6%) for a few elements, averaged out over the loss.
    assert torch.allclose(loss.float(), want_loss.float(), rtol=2e-2)
    trained = targets != IGNORE_INDEX
    assert (preds[trained] == want_preds[trained]).float().mean() > 0.9
    grads = [(p.grad, q.grad) for p, q in zip(fused.parameters(), plain.parameters(), strict=True) if p.requires_grad]
    rel = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in grads)
    assert rel < 0.1  # E5M2 gradients on a random tiny model
