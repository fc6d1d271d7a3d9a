"""Load what was written with the runtime that serves it, and check it against the in-memory trained model.

- ``vllm``: the FP8 bytes in the safetensors equal the trained bytes; transformers + compressed-tensors loads the
  folder on CPU and runs it (compressed-tensors decompresses ``weight · weight_scale`` on the first forward and
  fake-quantizes each targeted layer's input with the scheme's dynamic FP8 ``input_activations``, so the CPU run has
  the trainer's numerics); vLLM itself generates greedily where it is installed with a CUDA GPU.
- ``onnx``: the ``FLOAT8E4M3FN`` initializers equal the trained bytes; onnxruntime's CPU provider runs the graph.
- ``hf``: the dense weights equal ``deq(W)`` in the export dtype; transformers runs the folder.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors import safe_open
from torch import nn

from falqon_lit.layer import falqon_layers

from .fp8_source import cpu_readback_reference, weight_only_readback
from .hf_folder import checkpoint_name, high_precision_state_dict
from .onnx_graph import ONNX_FILE
from .standin import Precision
from .verify import Candidate, Sample, Tolerance, VerifyResult, activation_noise, as_exported, compare

NOISE_FACTOR = 2.0
"""Allowed logit error, in units of the model's own FP8 activation-rounding noise (see ``fp8_tolerance``): each of
the two runtimes lies about one noise from the float-activation logits, so they can lie two apart."""
MIN_AGREEMENT = 0.9
"""Allowed fraction of greedy positions whose argmax agrees with the trainer's."""


def fp8_tolerance(samples: Sequence[Sample], extra: str = "") -> Tolerance:
    """Tolerance for a runtime that is not bitwise torch's, stated against the activation-rounding noise.

    FP8 activation rounding is discontinuous: a runtime whose float32 arithmetic differs from torch's by one ulp
    (another summation order, another ``exp``) flips the FP8 rounding of single activations, and through the layers
    that moves the logits by up to the size of the activation-quantization noise itself. Measured on SmolLM2-135M:
    a 1e-6 relative perturbation of the embeddings moves the FP8 model's logits by 14 % (max relative), while it
    moves the float model's by ~1e-6. The noise is measured as float activations vs FP8 activations on the same
    weights and prompts; the runtime's own FP8 trajectory is another draw about as far from the float one, so by the
    triangle inequality the two FP8 runs can differ by up to twice the noise (``NOISE_FACTOR``; a 1.5 bound failed
    the trained SmolLM2 ONNX read-back at 1.63 × noise with every FP8 byte identical and the float64 graph exact).
    Broken weights, scales or axes land far outside.
    """
    noise = activation_noise(samples)
    return Tolerance(
        max(NOISE_FACTOR * noise, 1e-3),
        MIN_AGREEMENT,
        f"FP8 activation rounding amplifies 1-ulp float32 differences between runtimes up to the activation "
        f"quantization noise, here {noise:.2e} (same weights, float vs FP8 activations); allowed {NOISE_FACTOR}x "
        f"that, and argmax flips only at near-tied positions{extra}",
    )


def hp_rounding(model: nn.Module, dtype: torch.dtype) -> float:
    """Largest relative change ``max|t − dtype(t)| / max|t|`` of the exported high-precision tensors."""
    worst = 0.0
    for tensor in high_precision_state_dict(model, torch.float32).values():
        if tensor.is_floating_point() and tensor.numel():
            worst = max(
                worst, float((tensor - tensor.to(dtype).float()).abs().max() / tensor.abs().max().clamp(min=1e-30))
            )
    return worst


def _rounding_note(model: nn.Module, dtype: torch.dtype) -> str:
    rounding = hp_rounding(model, dtype)
    if not rounding:
        return ""
    name = str(dtype).removeprefix("torch.")
    return f"; embeddings/norms/lm_head rounded to {name} (max relative change {rounding:.1e})"


# ------------------------------------------------------------------------------------------------------------ vllm
def _stored_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``*.weight`` tensor of the folder's safetensors files."""
    stored = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight")})
    return stored


def vllm_bytes_identical(folder: Path, model: nn.Module) -> tuple[int, int]:
    """``(layers whose safetensors ``weight`` bytes equal the trained FP8 bytes, FP8 layers)``."""
    stored = _stored_weights(folder)
    layers = falqon_layers(model)
    same = 0
    for name, layer in layers.items():
        got = stored.get(f"{checkpoint_name(model, name)}.weight")
        want = layer.weight_fp8[: layer.out_features].detach().cpu()
        same += (
            got is not None and got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        )
    return same, len(layers)


def transformers_candidate(folder: Path) -> Candidate:
    """Load a folder with transformers (compressed-tensors for quantized ones) in float32 on CPU.

    float32 keeps ``weight_scale`` exact: transformers would otherwise cast it to the model dtype (bf16).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for tensor in [*model.parameters(), *model.buffers()]:
        # transformers keeps weights it merges on load (MoE experts) in the file's dtype, whatever ``dtype`` says
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor.data = tensor.data.float()

    @torch.no_grad()
    def run(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, use_cache=False).logits

    return run


EXACT = Tolerance(
    0.0,
    1.0,
    "the reference is the model as exported (high-precision tensors rounded to the export dtype) on the CPU, whose "
    "FP8 GEMM is compressed-tensors' own arithmetic (float32 GEMM of the dequantized operands): bit for bit",
)
"""Tolerance of a read-back that must reproduce the trainer exactly."""


def _exact_on_cpu(model: nn.Module) -> bool:
    """Whether transformers + compressed-tensors must reproduce the exported model's logits bit for bit.

    Needs the reference on the CPU and no FALQON bias (compressed-tensors adds it inside ``F.linear``, the trainer
    after the GEMM: another float32 rounding).
    """
    layers = falqon_layers(model).values()
    return next(model.parameters()).device.type == "cpu" and all(layer.bias is None for layer in layers)


def _memoized(candidate: Candidate) -> Candidate:
    """Run ``candidate`` once per input tensor (the exact and the noise checks score the same sequences)."""
    cache: dict[int, torch.Tensor] = {}

    def run(input_ids: torch.Tensor) -> torch.Tensor:
        if id(input_ids) not in cache:
            cache[id(input_ids)] = candidate(input_ids)
        return cache[id(input_ids)]

    return run


def verify_vllm_folder(
    folder: Path, model: nn.Module, samples: Sequence[Sample], dtype: torch.dtype
) -> list[VerifyResult]:
    """transformers + compressed-tensors on CPU, then vLLM where it can run.

    Where the arithmetic can be exact (CPU, no bias, FP8 activations as trained), the gate is bytes and arithmetic:
    the trained FP8 bytes in the file, and the folder's logits bit for bit those of the model as exported. The
    comparison with the unrounded trainer, bound by FP8-amplified noise (bf16 rounding of embeddings/norms/lm_head
    flips near-tied activations and tokens), is then reported as information. Otherwise that noise-bound comparison
    is the gate. A folder whose logits transformers cannot reproduce on CPU (see ``cpu_readback_reference``) is
    gated by its bytes alone.
    """
    backend = "transformers + compressed-tensors (CPU)"
    samples, not_comparable = cpu_readback_reference(model, samples)
    tolerance = fp8_tolerance(samples, _rounding_note(model, dtype))
    if not_comparable:
        noise = VerifyResult(backend, tolerance, notes=[not_comparable])
    else:
        candidate = _memoized(transformers_candidate(folder))
        noise = compare(samples, candidate, backend, tolerance)
    noise.bytes_identical = vllm_bytes_identical(folder, model)
    if not_comparable or weight_only_readback(model) or not _exact_on_cpu(model):
        return [noise, vllm_engine_check(folder, samples)]
    exact = compare(as_exported(model, samples, dtype), candidate, backend, EXACT)
    exact.bytes_identical = noise.bytes_identical
    noise.backend = f"{backend} vs unrounded trainer"
    noise.informational = True
    noise.notes.append("information only: the exact check above verified the bytes and the arithmetic")
    return [exact, noise, vllm_engine_check(folder, samples)]


def vllm_engine_check(folder: Path, samples: Sequence[Sample]) -> VerifyResult:
    """Greedy generation through ``vllm.LLM`` compared token by token (prefix) with the reference's greedy tokens."""
    tolerance = Tolerance(
        math.inf,  # no logits to bound (see unmeasured)
        0.75,
        "vLLM computes in bf16 between layers and quantizes dynamic FP8 inputs per token (its W8A8 FP8 path), so "
        "near-tied tokens may flip; agreement counts matching greedy prefixes",
    )
    result = VerifyResult("vLLM", tolerance, unmeasured="vLLM returns generated tokens, not logits: only agreement")
    if importlib.util.find_spec("vllm") is None:
        result.skipped = "vLLM is not installed (pip install 'falqon-lit[vllm]' on a CUDA host)"
        return result
    if not torch.cuda.is_available():
        result.skipped = "vLLM needs a CUDA GPU; none is visible"
        return result
    from vllm import LLM, SamplingParams

    new_tokens = samples[0].input_ids.shape[1] - samples[0].prompt_len
    llm = LLM(model=str(folder), enforce_eager=True, gpu_memory_utilization=0.4, max_model_len=512)
    prompts = [{"prompt_token_ids": s.input_ids[0, : s.prompt_len].tolist()} for s in samples]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    matched = identical = 0
    for sample, output in zip(samples, outputs, strict=True):
        want = sample.input_ids[0, sample.prompt_len :].tolist()
        got = list(output.outputs[0].token_ids)
        prefix = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
        matched += prefix
        identical += prefix == len(want)
    result.token_agreement = matched / (len(samples) * new_tokens)
    result.prompts_identical, result.prompts = identical, len(samples)
    return result


# ------------------------------------------------------------------------------------------------------------ onnx
def onnx_bytes_identical(folder: Path, model: nn.Module) -> tuple[int, int]:
    """``(layers whose FLOAT8E4M3FN initializer bytes equal the trained FP8 bytes, FP8 layers)``."""
    graph = onnx.load(str(folder / ONNX_FILE)).graph
    inits = {i.name: i for i in graph.initializer}
    layers = falqon_layers(model)
    same = 0
    for name, layer in layers.items():
        init = inits.get(f"{name}.weight_fp8")
        want = layer.weight_fp8[: layer.out_features].detach().cpu().view(torch.uint8).numpy()
        if init is None or init.data_type != onnx.TensorProto.FLOAT8E4M3FN or list(init.dims) != list(want.shape):
            continue
        same += np.frombuffer(init.raw_data, dtype=np.uint8).tobytes() == want.tobytes()
    return same, len(layers)


def onnxruntime_candidate(folder: Path) -> Candidate:
    """An onnxruntime CPU session over ``model.onnx``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])

    def run(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.numpy().astype(np.int64)
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return torch.from_numpy(logits)

    return run


WIDE = Tolerance(
    1e-6,
    1.0,
    "float64 graph vs the trainer's FP8 arithmetic in float64: the runtimes differ only in float64 rounding "
    "(~1e-15), far below the FP8 activation steps it would have to cross, so the logits agree to float32 rounding "
    "and every greedy token must be identical",
)


def verify_onnx_folder(
    folder: Path, model: nn.Module, samples: Sequence[Sample], activations: str, precision: str = "float32"
) -> list[VerifyResult]:
    """onnxruntime (CPU) against the reference (for a float64 graph, ``samples`` are the float64 reference), plus
    the FP8 initializer bytes."""
    if Precision(precision) == Precision.FLOAT64:
        tolerance = WIDE
    else:
        weight_only = "; weight-only graph: activations stay float32 (the trainer rounds them)"
        tolerance = fp8_tolerance(samples, "" if activations == "fp8" else weight_only)
    result = compare(samples, onnxruntime_candidate(folder), f"onnxruntime (CPU, {precision})", tolerance)
    result.bytes_identical = onnx_bytes_identical(folder, model)
    return [result]


# -------------------------------------------------------------------------------------------------------------- hf
def hf_weights_identical(folder: Path, model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """``(layers whose dense weight equals deq(W) cast to dtype, FALQON layers)``."""
    stored = _stored_weights(folder)
    layers = falqon_layers(model)
    same = sum(
        torch.equal(
            stored.get(f"{checkpoint_name(model, n)}.weight", torch.empty(0)),
            m.dequantized_weight(torch.float32).cpu().to(dtype),
        )
        for n, m in layers.items()
    )
    return same, len(layers)


def verify_hf_folder(
    folder: Path, model: nn.Module, samples: Sequence[Sample], dtype: torch.dtype
) -> list[VerifyResult]:
    """transformers (CPU) on the dequantized folder."""
    tolerance = fp8_tolerance(
        samples, "; dense folder: activations stay float32 (the trainer rounds them)" + _rounding_note(model, dtype)
    )
    result = compare(samples, transformers_candidate(folder), "transformers, dequantized (CPU)", tolerance)
    result.bytes_identical = hf_weights_identical(folder, model, dtype)
    result.notes.append(
        f"weights column: dense weights bitwise equal to deq(W) cast to {str(dtype).removeprefix('torch.')}"
    )
    return [result]
