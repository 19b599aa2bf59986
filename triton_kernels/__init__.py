"""Triton kernels of interpolatron (installed as ``interpolatron.triton_kernels``)."""
