"""Triton steering kernels and their torch references (installed as sae_steer.kernels)."""
