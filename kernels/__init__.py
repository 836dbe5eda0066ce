"""Triton kernels with a PyTorch reference each (DESIGN §5); shipped as mmcompress.kernels."""
