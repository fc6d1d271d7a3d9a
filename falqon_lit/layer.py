"""``FalqonLinear``: a LoRA adapter melded into an FP8 backbone linear (paper §3).

Stored state (buffers, not Parameters, so no optimizer ever sees them):

- ``weight_fp8`` ``(out + r, in)`` E4M3: the melded ``[W; A]``; ``weight_t_fp8`` ``(in, out + r)`` its row-major
  transpose for the backward GEMM (rebuilt on load, never saved; ``None`` with ``transpose_cache=False``);
- ``weight_scale``: ``(1,)`` tensor scale, ``(out + r, 1)`` row scales, or ``(out + r, ceil(in / 128))`` block
  scales in row-expanded form (``A``'s rows start a block row of their own, so no block mixes ``W`` and ``A``);
- ``merge_*`` counters of the row-wise proxy update.

The only trainable tensor is ``lora_B`` ``(out, r)``; the base bias, if any, is frozen. What callers may use of it,
the row-sharded layer offers as well: both implement ``layer_base.FalqonLayer``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from falqon_lit.config import FP8_GEMM_ALIGNMENT, BPolicy, FalqonConfig, InitMethod, Rounding, ScaleGranularity
from falqon_lit.fp8 import triton_merge
from falqon_lit.fp8.gemm import resolve_backend
from falqon_lit.fp8.numerics import E4M3, dequantize, group_count, quantize_weight
from falqon_lit.functional import FalqonLinearFunction, MeldedArgs
from falqon_lit.layer_base import FalqonLayer, salt_of
from falqon_lit.merge_policy import hold_small_rows
from falqon_lit.proxy import select_rows


def init_lora_A(weight_hp: torch.Tensor, rank: int, config: FalqonConfig, salt: int) -> torch.Tensor:
    """Initial ``A`` ``(r, in)``: top-r right factor ``sqrt(S_r) V_rᵀ`` of the FP8 error ``W − deq(Q(W))``, or random.

    The SVD choice follows the reference implementation: ``A`` then spans the directions FP8 rounding lost most.
    ``init: random`` and ``init: gradient`` (random until its calibration pass, ``falqon_lit.adapter_init``) draw
    PEFT's kaiming-uniform ``A`` from a CPU generator seeded by ``salt`` (the layer's name hash): two conversions of
    a model give the same bytes, every data-parallel rank the same ``A`` without a broadcast, and the caller's RNG
    stream is left as it was. Times ``lora_alpha / rank`` when ``lora_alpha`` is set.
    """
    weight = weight_hp.detach().float()
    alpha_scale = 1.0 if config.lora_alpha is None else config.lora_alpha / rank
    if config.init != InitMethod.SVD:
        lora_A = torch.empty(rank, weight.shape[1])
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=torch.Generator().manual_seed(salt))  # PEFT's
        return alpha_scale * lora_A.to(weight.device)
    w_fp8, w_scale = quantize_weight(weight, config.weight_scaling)
    error = weight - dequantize(w_fp8, w_scale)  # (out, in)
    _, s, vh = torch.linalg.svd(error, full_matrices=False)
    return alpha_scale * s[:rank].sqrt().unsqueeze(1) * vh[:rank]  # (r, in)


class FalqonLinear(FalqonLayer):
    """Drop-in replacement for ``nn.Linear`` running FALQON's melded FP8 forward and backward, all rows on one device.

    Args:
        in_features: input width; a multiple of 16.
        out_features: output width; a multiple of 16.
        config: rank, scaling, B policy and backend.
        bias: keep a (frozen) bias.
        device: where the buffers live.
        dtype: dtype of ``lora_B`` and the bias.

    Raises:
        ValueError: misaligned dimensions or a rank not below ``min(in_features, out_features)``.
    """

    rows_are_local = True
    _dtype_fixed_buffers = ("weight_fp8", "weight_t_fp8", "weight_scale", "merge_magnitude")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: FalqonConfig,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, config)
        if in_features % FP8_GEMM_ALIGNMENT or out_features % FP8_GEMM_ALIGNMENT:
            raise ValueError(
                f"FalqonLinear needs in_features and out_features divisible by {FP8_GEMM_ALIGNMENT} for FP8 GEMMs, "
                f"got ({in_features}, {out_features}); add the layer to 'ignore'"
            )
        if config.rank >= min(in_features, out_features):
            raise ValueError(
                f"rank must be < min(in_features, out_features) = {min(in_features, out_features)}, got {config.rank}"
            )
        rows = out_features + config.rank
        scale_shape = {
            ScaleGranularity.TENSOR: (1,),
            ScaleGranularity.ROW: (rows, 1),
            ScaleGranularity.BLOCK: (rows, group_count(in_features)),
        }[config.weight_scaling]
        self.register_buffer("weight_fp8", torch.zeros(rows, in_features, dtype=E4M3, device=device))
        weight_t = torch.zeros(in_features, rows, dtype=E4M3, device=device) if config.transpose_cache else None
        self.register_buffer("weight_t_fp8", weight_t, persistent=False)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, device=device, dtype=dtype))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        for name in ("merge_rows", "merge_saturated", "merge_lost", "merge_calls"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("merge_magnitude", torch.zeros((), dtype=torch.float32, device=device))
        self.mark_b_zero()

    # ----------------------------------------------------------------------------------------------------- build
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FalqonConfig, name: str = "") -> FalqonLinear:
        """Quantize ``linear`` into a new ``FalqonLinear`` on the same device.

        Raises:
            TypeError: non-floating weight.
            ValueError: non-finite weight, or the dimension/rank problems of the constructor.
        """
        weight = linear.weight.detach()
        where = f" (layer {name!r})" if name else ""
        if not weight.is_floating_point() or weight.dtype in (E4M3, torch.float8_e5m2):
            raise TypeError(f"FalqonLinear needs a high-precision floating weight, got {weight.dtype}{where}")
        if not torch.isfinite(weight).all():
            raise ValueError(f"FalqonLinear got a weight with NaN or inf values{where}; fix the checkpoint first")
        lora_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        try:
            layer = cls(
                linear.in_features, linear.out_features, config, linear.bias is not None, weight.device, lora_dtype
            )
        except ValueError as err:
            raise ValueError(f"{err}{where}") from None
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        layer.salt = salt_of(name)
        layer.set_weight(weight, init_lora_A(weight, config.rank, config, layer.salt))
        return layer

    @torch.no_grad()
    def set_weight(self, weight_hp: torch.Tensor, lora_A_hp: torch.Tensor) -> None:
        """Quantize ``[W; A]`` into the FP8 buffers with a fresh scale (tensor, per row, or per block)."""
        if self.config.weight_scaling == ScaleGranularity.BLOCK:
            # A's rows start a block row of their own: a block never mixes W's scale with A's.
            (w_fp8, w_scale), (a_fp8, a_scale) = (quantize_weight(t.float(), ScaleGranularity.BLOCK)
                                                  for t in (weight_hp, lora_A_hp))  # fmt: skip
            data, scale = torch.cat([w_fp8, a_fp8]), torch.cat([w_scale, a_scale])
        else:
            melded = torch.cat([weight_hp.float(), lora_A_hp.float()], dim=0)  # (out + r, in)
            data, scale = quantize_weight(melded, self.config.weight_scaling)
        self.weight_fp8.copy_(data)
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        self.refresh_transpose()

    def refresh_transpose(self) -> None:
        """Rebuild the stored transpose ``weight_t_fp8`` from ``weight_fp8`` (after its bytes were written whole)."""
        if self.config.transpose_cache:
            self.weight_t_fp8 = self.weight_fp8.t().contiguous()

    # --------------------------------------------------------------------------------------------------- forward
    # torch.compile runs this layer as it is (a few fused kernels already) and compiles the blocks around it:
    # tracing into it would recompile on the Python-side B-is-zero token of every layer.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W + B A)ᵀ + bias`` with ``W`` and ``A`` in FP8; exact whether or not ``B`` holds a residual."""
        backend = resolve_backend(self.config.backend, x.device)
        y = FalqonLinearFunction.apply(
            x,
            self.lora_B,
            self.weight_fp8,
            self.weight_t_fp8,
            self.weight_scale,
            MeldedArgs(self.config.act_scaling, backend, residual=not self.b_is_zero()),
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def recheck_b_zero(self) -> None:
        """One read of ``B`` (outside the step) decides which forward path runs."""
        self.mark_b_written()
        if self.lora_B.device.type != "meta" and not bool(self.lora_B.detach().any()):
            self.mark_b_zero()

    def _b_token(self) -> tuple[int, int]:
        return (self.lora_B.data_ptr(), self.lora_B._version)

    # ------------------------------------------------------------------------------------------ dense views
    def local_lora_B(self) -> torch.Tensor:
        """``B`` ``(out, r)``, detached."""
        return self.lora_B.detach()

    @property
    def weight_scale_rows(self) -> torch.Tensor:
        """Scales of the ``W`` rows only: ``(1,)`` or ``(out, 1)`` (the vLLM ``weight_scale`` shape)."""
        return self.weight_scale if self.weight_scale.numel() == 1 else self.weight_scale[: self.out_features]

    def lora_A_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``A``'s FP8 rows ``(r, in)`` and of their scales (``(1,)``: the tensor scale ``W`` shares)."""
        scale = self.weight_scale if self.weight_scale.numel() == 1 else self.weight_scale[self.out_features :]
        return self.weight_fp8[self.out_features :], scale

    @torch.no_grad()
    def write_lora_A(self, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        """As ``FalqonLayer.write_lora_A``, and into the stored transpose's ``A`` columns."""
        super().write_lora_A(data, scale)
        if self.weight_t_fp8 is not None:
            self.weight_t_fp8[:, self.out_features :] = data.t()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``deq(W)`` ``(out, in)``, the FP8 backbone weight alone."""
        return dequantize(self.weight_fp8[: self.out_features], self.weight_scale_rows, dtype)

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """All of this layer's state: data-parallel replicas hold it whole, so it must be byte-identical."""
        return {"weight_fp8": self.weight_fp8, "weight_scale": self.weight_scale, "lora_B": self.lora_B}

    # ------------------------------------------------------------------------------------- row-wise proxy update
    @torch.no_grad()
    def proxy_update(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Merge the ``k`` rows of ``B`` with the largest L1 norm into ``W`` (Alg. 2), then apply the B policy.

        Args:
            k: rows to merge.
            rows: those rows, when the caller selected them already (``ProxyUpdater`` runs one top-k for many
                layers); sorted, unique, on the layer's device.

        Returns:
            The merged row indices (device tensor).
        """
        if k <= 0:
            raise ValueError(f"proxy_update needs k > 0, got {k}")
        rows = select_rows(self.lora_B, k) if rows is None else rows
        held = hold_small_rows(self, rows)  # merge policy: rows below merge_threshold stay in B (None: merge all)
        self._merge(rows, self.config.merge_rounding)
        if self.config.b_policy == BPolicy.ZERO:
            self.lora_B.zero_()
            self.mark_b_zero()
        elif held is None:
            self.lora_B.index_fill_(0, rows, 0.0)
        else:
            self.lora_B.index_copy_(0, rows, held)
        return rows

    @torch.no_grad()
    def flush(self, rounding: Rounding = Rounding.NEAREST) -> int:
        """Merge every non-zero row of ``B`` and zero ``B``, so the FP8 weight alone is the trained model.

        Args:
            rounding: of the merged rows; the final flush rounds to nearest (the closest FP8 values, no noise), a
                flush mid-training (before an A refresh) rounds as the proxy update does.

        Returns:
            The number of rows merged (reads it on the host; call at the end of training, not per step).
        """
        rows = (self.lora_B != 0).any(dim=1).nonzero().squeeze(1)
        if rows.numel():
            self._merge(rows, rounding)
        self.lora_B.zero_()
        self.mark_b_zero()
        return int(rows.numel())

    def _merge(self, rows: torch.Tensor, rounding: Rounding) -> None:
        self.merge_rows += rows.numel()
        self.merge_calls += 1
        stochastic = rounding == Rounding.STOCHASTIC
        if triton_merge.available(self.weight_fp8, self.config.weight_scaling):
            stats = triton_merge.merge_rows_fused(
                rows, self.lora_B, self.weight_fp8, self.weight_t_fp8, self.weight_scale, self.out_features,
                merge_count=self.merge_calls if stochastic else None, salt=self.salt,
            )  # fmt: skip
            self.merge_saturated += stats[0].long()
            self.merge_lost += stats[1].long()
            self.merge_magnitude += stats[2]
            return
        result = self._merge_eager(rows, rounding)
        if self.weight_t_fp8 is not None:  # the stored transpose gets the same bytes
            self.weight_t_fp8.view(torch.uint8).index_copy_(1, rows, result.rows_fp8.view(torch.uint8).t())

    # ------------------------------------------------------------------------------------------ module plumbing
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self.refresh_transpose()


def falqon_layers(model: nn.Module) -> dict[str, FalqonLayer]:
    """All FALQON layers of ``model`` (every ``FalqonLayer``: dense, grouped or row-sharded) by fully qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FalqonLayer)}


@torch.no_grad()
def flush_all(model: nn.Module) -> int:
    """Merge every pending row of ``B`` of every FALQON layer into its FP8 weights, so ``W`` alone is the trained
    model (before export, and at the end of fit).

    Returns:
        Rows merged over all layers (0 when every ``B`` was already zero).
    """
    return sum(layer.flush() for layer in falqon_layers(model).values())
