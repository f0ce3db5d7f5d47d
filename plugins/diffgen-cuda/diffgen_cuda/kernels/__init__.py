"""Triton kernels; importing a module here imports Triton."""
