"""Triton kernels of grpo-fast, one fused op per file; installed and imported as `grpo_fast.kernels`."""
