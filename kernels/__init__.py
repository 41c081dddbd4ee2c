"""Triton steering kernels and their torch references (installed as sae_steer.kernels).

sparse_steer  encode only the edited features, edit, add the decode delta: the per-layer hot path
full_steer    full-width encode of one SAE (TopK SAEs, telemetry), then the same epilogue
Each dispatcher runs Triton on CUDA tensors and the torch reference otherwise; see docs/kernels.md.
"""
from .full_steer import full_steer, full_steer_reference
from .sparse_steer import HAS_TRITON, sparse_steer, sparse_steer_reference

__all__ = ["HAS_TRITON", "full_steer", "full_steer_reference", "sparse_steer", "sparse_steer_reference"]
