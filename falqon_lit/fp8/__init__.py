"""FP8 numerics and kernels: formats and scales, quantizer objects, the scaled GEMM, Triton and TE back-ends.

- ``numerics``: pure functions (amax → scale, saturating cast, quantize/dequantize, stochastic rounding);
- ``quantizer``: ``Float8Quantizer`` objects, the one place where TE, Triton or eager quantization is chosen;
- ``gemm``: ``fp8_gemm``, the scaled GEMM on the chosen back-end;
- ``triton_quantize`` / ``triton_merge``: fused CUDA kernels (quantize + transpose; row merge + requantize);
- ``te_backend``: Transformer Engine's quantizers and GEMM, imported only when ``backend: te`` is used.
"""
