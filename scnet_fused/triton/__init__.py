"""Triton kernels and their launchers (no autograd, no torch.library: see scnet_fused.ops)."""
