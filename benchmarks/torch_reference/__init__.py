"""A PyTorch reference of LAGA-Net training, for trajectory parity and speed comparisons (see README.md).

torch is not a requirement of the project: only `spec` and `jax_side` are imported without it.
"""
