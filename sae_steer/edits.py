"""Reference steering math for ONE request at ONE layer, in plain torch.

    feature edit   x' = x + sum_i gate_i * (f'_i - f_i) * W_dec[i]     (the SAE's error term is kept)
                   (/ c(x) for constant_norm_rescale SAEs: SparseAutoencoder.edit_delta)
                   add: f' = f + strength   clamp: f' = value   ablate: f' = 0   scale: f' = factor * f
    when           gate_i = [f_when(x) > above]  (same SAE), else gate_i = 1
    CAA            x' = x + coef * v
    positions      all | prompt (position < prompt_len) | generated (position >= prompt_len)

Every intervention at a layer reads the same unedited x and their deltas add up. This module
loops over interventions on purpose: it is the readable ground truth that the batched hook
(`sae_steer.vllm_plugin.table`) and the kernels are tested against, not the hot path.
"""
from __future__ import annotations

import torch

from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeIntervention, Steering, VectorIntervention


def position_mask(positions: torch.Tensor, prompt_len: int, mode: str) -> torch.Tensor:
    """positions [T] (absolute, 0-based) -> bool [T]: which tokens the steering edits."""
    if mode == "all":
        return torch.ones_like(positions, dtype=torch.bool)
    if mode == "prompt":
        return positions < prompt_len
    return positions >= prompt_len


def feature_edit_delta(sae: SparseAutoencoder, x: torch.Tensor, edit: SaeIntervention) -> torch.Tensor:
    """x [T, d_model] -> the delta [T, d_model] of one feature edit."""
    f = sae.encode_features(x, torch.tensor([edit.feature]))[:, 0]  # [T]
    a, b = edit.edit_coefficients()
    change = (a * f + b) - f  # f' - f, [T]
    if edit.when is not None:
        gate = sae.encode_features(x, torch.tensor([edit.when.feature]))[:, 0]
        change = change * (gate > edit.when.above)
    return sae.edit_delta(x, change[:, None], torch.tensor([edit.feature]))


def vector_delta(iv: VectorIntervention, layer: int, vectors: dict[str, dict[int, torch.Tensor]]) -> torch.Tensor | None:
    """coef * v for this layer, or None when the vector has nothing at this layer."""
    if iv.values is not None:
        return iv.coef * torch.tensor(iv.values) if iv.layer == layer else None
    if iv.layer is not None and iv.layer != layer:
        return None
    v = vectors[iv.vector].get(layer)
    return None if v is None else iv.coef * v


def steer_residual(x: torch.Tensor, positions: torch.Tensor, prompt_len: int, layer: int, steering: Steering,
                   saes: dict[str, SparseAutoencoder], vectors: dict[str, dict[int, torch.Tensor]]) -> torch.Tensor:
    """The residual stream after `layer` for one request: x [T, d_model] -> x' [T, d_model]."""
    x = x.float()
    delta = torch.zeros_like(x)
    for iv in steering.interventions:
        if isinstance(iv, SaeIntervention):
            sae = saes[iv.sae]
            if sae.layer == layer:
                delta += feature_edit_delta(sae.to(dtype=torch.float32), x, iv)
        elif isinstance(iv, VectorIntervention):  # `logit` interventions act on the logits, not here
            d = vector_delta(iv, layer, vectors)
            if d is not None:
                delta += d.float()
    mask = position_mask(positions, prompt_len, steering.positions)
    return torch.where(mask[:, None], x + delta, x)
