"""Kernels, each beside the plain-PyTorch reference that defines its math."""
