"""Triton steering kernels and their torch references (installed as sae_steer.kernels).

sparse_steer  encode only the live edits' features, edit, add the decode delta: the per-layer hot path
              (Triton on CUDA tensors, torch otherwise); TopK features read a full encode
full_steer    full-width encode of a layer's TopK SAEs for a device list of tokens
ops           both as registered torch ops (`sae_steer_kernels::steer`, `::encode_rows`), which the table
              calls; see docs/kernels.md.
"""
from .sparse_steer import HAS_TRITON, sparse_steer, sparse_steer_reference

__all__ = ["HAS_TRITON", "sparse_steer", "sparse_steer_reference"]
