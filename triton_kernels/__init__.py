"""Triton kernels of fusedloss, installed as `fusedloss.triton_kernels` (never top level:
triton ships its own `triton_kernels` package)."""
