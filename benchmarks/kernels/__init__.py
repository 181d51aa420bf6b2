"""Kernel timings: int4 CPU and GPU kernels, the ONNX Runtime anchor, int8 activations."""
