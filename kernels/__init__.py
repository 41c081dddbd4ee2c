"""Triton steering kernels and their torch references (installed as sae_steer.kernels).

sparse_steer  encode only the edited features, edit, add the decode delta: the per-layer hot path
              (Triton on CUDA tensors, torch otherwise)
full_steer    full-width encode of one SAE: `topk_segment` gives the hot path a TopK SAE's members;
              full_steer_triton / full_steer_reference (encode + the same epilogue) are its benchmark
              and test; see docs/kernels.md.
"""
from .full_steer import full_steer_reference, topk_segment
from .sparse_steer import HAS_TRITON, sparse_steer, sparse_steer_reference

__all__ = ["HAS_TRITON", "full_steer_reference", "sparse_steer", "sparse_steer_reference", "topk_segment"]
