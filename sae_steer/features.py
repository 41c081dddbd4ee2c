"""Feature metadata for people choosing what to steer: decoder norms, logit-lens top tokens, labels.

Pure functions over tensors and files; the HTTP layer decides how to expose them.

Logit lens of feature i: what adding W_dec[i] to the final residual stream pushes the next-token
logits towards, i.e. the direction through the model's final norm and unembedding:
    logits = W_U @ (w * d / sqrt(mean(d^2) + eps))        d = W_dec[i]  [d_model], W_U [vocab, d_model]
(RMSNorm is scale-invariant up to eps, so the ranking does not depend on |W_dec[i]|.) Models whose
norm multiplies by (1 + w), such as Gemma, must be given 1 + w.

Labels: a Neuronpedia-style export, either a list of {"index": ..., "description": ...} (Neuronpedia's
explanation exports; index may be a numeric string; the first description of an index wins) or
a plain object {"12": "description", ...}.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from sae_steer.sae import SparseAutoencoder


def decoder_norms(sae: SparseAutoencoder) -> torch.Tensor:
    """[d_sae]: |W_dec[i]|, how far one unit of feature i moves the residual stream."""
    return sae.W_dec.float().norm(dim=1)


def logit_lens(direction: torch.Tensor, norm_weight: torch.Tensor, eps: float, unembed: torch.Tensor,
               k: int = 10) -> dict[str, list[tuple[int, float]]]:
    """direction [d_model], norm_weight [d_model], unembed [vocab, d_model] ->
    {"top": [(token_id, logit)] * k (most promoted), "bottom": [...] (most suppressed)}."""
    d = direction.float()
    h = norm_weight.float() * d * torch.rsqrt(d.pow(2).mean() + eps)
    logits = unembed.float() @ h  # [vocab]
    k = min(k, logits.shape[0])
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    return {"top": list(zip(top.indices.tolist(), top.values.tolist())),
            "bottom": list(zip(bottom.indices.tolist(), bottom.values.tolist()))}


class LogitLens:
    """logit_lens for the features of registered SAEs against one model, cached per (sae, feature, k)."""

    def __init__(self, saes: dict[str, SparseAutoencoder], norm_weight: torch.Tensor, eps: float,
                 unembed: torch.Tensor, cache_size: int = 4096):
        self.saes, self.norm_weight, self.eps, self.unembed = saes, norm_weight, eps, unembed
        self.top_tokens = functools.lru_cache(maxsize=cache_size)(self._top_tokens)

    def _top_tokens(self, sae: str, feature: int, k: int = 10) -> dict[str, list[tuple[int, float]]]:
        W_dec = self.saes[sae].W_dec
        if not 0 <= feature < W_dec.shape[0]:
            raise ValueError(f"feature {feature} is out of range for SAE {sae!r} (d_sae={W_dec.shape[0]})")
        return logit_lens(W_dec[feature], self.norm_weight, self.eps, self.unembed, k)


def load_labels(path: str | Path, d_sae: int | None = None) -> dict[int, str]:
    """{feature index: description} from a label file; indices checked against d_sae when given."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"label file {str(path)!r} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"label file {str(path)!r} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list) and all(isinstance(e, dict) for e in data):
        pairs = [(e.get("index"), e.get("description")) for e in data]
    else:
        raise ValueError(f"label file {str(path)!r} must hold a list of {{index, description}} or an object "
                         f"index -> description")
    labels: dict[int, str] = {}
    for index, description in pairs:
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise ValueError(f"label file {str(path)!r}: index {index!r} is not an integer") from None
        if not isinstance(description, str):
            raise ValueError(f"label file {str(path)!r}: feature {i} has no string description")
        if i < 0 or (d_sae is not None and i >= d_sae):
            raise ValueError(f"label file {str(path)!r}: feature {i} is out of range (d_sae={d_sae})")
        labels.setdefault(i, description)
    return labels
