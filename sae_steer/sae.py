"""SparseAutoencoder: the reference math for the SAE architectures users load.

    sae_in = x - b_dec                     (when apply_b_dec_to_input)
    pre    = sae_in @ W_enc + b_enc        [..., d_sae]
    f      = act(pre)
    x_hat  = f @ W_dec + b_dec             [..., d_model]

act per architecture (the same definitions as SAELens / Gemma Scope / sparsify):
    relu      f = relu(pre)
    jumprelu  f = relu(pre) * (pre > threshold)
    topk      f = relu(pre) kept at the k largest entries of pre, 0 elsewhere
    gated     f = (sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)
              (for gated, b_enc holds b_gate)

Everything here is plain torch and written for clarity: it is the reference every fast
path (the batched steering table, the Triton kernels) is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

ARCHITECTURES = ("relu", "jumprelu", "topk", "gated")


@dataclass
class SparseAutoencoder:
    W_enc: torch.Tensor  # [d_model, d_sae]
    b_enc: torch.Tensor  # [d_sae]    (b_gate for gated SAEs)
    W_dec: torch.Tensor  # [d_sae, d_model]
    b_dec: torch.Tensor  # [d_model]
    layer: int  # residual stream after decoder layer `layer` (0-based)
    architecture: str = "relu"
    threshold: torch.Tensor | None = None  # jumprelu [d_sae]
    k: int | None = None  # topk
    b_mag: torch.Tensor | None = None  # gated [d_sae]
    r_mag: torch.Tensor | None = None  # gated [d_sae]
    apply_b_dec_to_input: bool = True
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        d_model, d_sae = self.W_enc.shape
        expect = {"b_enc": (d_sae,), "W_dec": (d_sae, d_model), "b_dec": (d_model,)}
        needed = {"jumprelu": ("threshold",), "gated": ("b_mag", "r_mag"), "topk": (), "relu": ()}
        for name in needed[self.architecture]:
            if getattr(self, name) is None:
                raise ValueError(f"{self.architecture} SAE needs {name!r}")
            expect[name] = (d_sae,)
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"SAE tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                                 f"(W_enc is {[d_model, d_sae]})")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= d_sae):
            raise ValueError(f"topk SAE needs 0 < k <= d_sae={d_sae}, got k={self.k}")
        if self.layer < 0:
            raise ValueError(f"SAE layer must be >= 0, got {self.layer}")

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device=None, dtype=None) -> "SparseAutoencoder":
        """A copy with every tensor moved/converted once (k, layer, flags unchanged)."""
        def conv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return replace(self, W_enc=conv(self.W_enc), b_enc=conv(self.b_enc), W_dec=conv(self.W_dec),
                       b_dec=conv(self.b_dec), threshold=conv(self.threshold), b_mag=conv(self.b_mag),
                       r_mag=conv(self.r_mag))

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> f [..., d_sae]: every feature."""
        return self._activate(self.sae_in(x), slice(None))

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Sparse encode: x [..., d_model], features [n] -> f [..., n], only those features.

        TopK needs every pre-activation to know which features survive, so it encodes fully.
        """
        if self.architecture == "topk":
            return self.encode(x)[..., features]
        return self._activate(self.sae_in(x), features)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., d_sae] -> x_hat [..., d_model]"""
        return f @ self.W_dec + self.b_dec

    def _activate(self, sae_in: torch.Tensor, idx) -> torch.Tensor:
        W = self.W_enc[:, idx]  # [d_model, n]
        pre = sae_in @ W + self.b_enc[idx]  # [..., n]
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold[idx])
        if self.architecture == "gated":
            mag = sae_in @ (W * torch.exp(self.r_mag[idx])) + self.b_mag[idx]
            return (pre > 0) * torch.relu(mag)
        # topk (only reached with every feature selected)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
