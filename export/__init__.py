"""Exporters: vLLM (compressed-tensors FP8), ONNX and dequantized HF folders."""
