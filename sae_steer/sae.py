"""SparseAutoencoder: the reference math for the SAE architectures users load.

    c      = sqrt(d_model) / |x|           (normalize_activations="constant_norm_rescale", else c = 1)
    sae_in = c x - b_dec                   (- b_dec only when apply_b_dec_to_input)
    pre    = sae_in @ W_enc + b_enc        [..., d_sae]
    f      = act(pre)
    x_hat  = (f @ W_dec + b_dec) / c + W_lookup[token]     [..., d_model]

act per architecture (the same definitions as SAELens / Gemma Scope / sparsify):
    relu      f = relu(pre)
    jumprelu  f = relu(pre) * (pre > threshold)
    topk      f = relu(pre) kept at the k largest entries of pre, 0 elsewhere
    gated     f = (sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)
              (for gated, b_enc holds b_gate)

Units: x, x_hat and every steering delta are in the model's own residual units. A constant
input scale (SAELens `expected_average_only_in`, a TopK decoder-norm rescale, a fine-tuning
scale of the feature activations) is folded into W_enc / W_dec / b_dec by the loaders, which is
exact; only the per-token `constant_norm_rescale` stays a runtime step, so the delta of a feature
edit is  x' - x = sum_i (f'_i - f_i) W_dec[i] / c(x)  (= decode(f') - decode(f) with the same x).

Tokenized SAEs (Dooms & Wilhelm 2024) add a per-token lookup bias W_lookup [vocab, d_model] to
the reconstruction only; their encoder does not see the token (tdooms/tokenized-sae, base.py:
`forward = lookup(decode(encode(x)), tokens)`), so feature-edit deltas do not depend on it.

Everything here is plain torch and written for clarity: it is the reference every fast
path (the batched steering table, the Triton kernels) is tested against.

The fast paths evaluate every architecture with one formula over per-feature parameters, with
b_dec folded into the biases (`packed`, the one place where that folding is written):

    dot = x . W_enc[:, i]
    f_i = (dot + gate_bias_i > threshold_i) * relu(mag_scale_i dot + mag_bias_i)     (TopK: then its top k)

    gate_bias = b_enc - b_dec . W_enc[:, i]    mag_scale = exp(r_mag) (gated) else 1
    mag_bias  = (b_mag if gated else b_enc) - mag_scale b_dec . W_enc[:, i]
    threshold = threshold (jumprelu) else 0
(relu: (pre > 0) relu(pre) = relu(pre); gated: the gate and the magnitude share W_enc's direction.)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

ARCHITECTURES = ("relu", "jumprelu", "topk", "gated")
NORMALIZATIONS = ("none", "constant_norm_rescale")


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
    normalize_activations: str = "none"  # or "constant_norm_rescale" (per-token, see the module doc)
    W_lookup: torch.Tensor | None = None  # tokenized SAE [vocab, d_model]
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
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize_activations {self.normalize_activations!r}; expected one of "
                             f"{NORMALIZATIONS} (constant input scales are folded into the weights by the loaders)")
        if self.W_lookup is not None and (self.W_lookup.dim() != 2 or self.W_lookup.shape[1] != d_model):
            raise ValueError(f"SAE tensor 'W_lookup' has shape {list(self.W_lookup.shape)}, expected [vocab, {d_model}]")
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
                       r_mag=conv(self.r_mag), W_lookup=conv(self.W_lookup))

    def n_params(self) -> int:
        return sum(t.numel() for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.b_mag,
                                       self.r_mag, self.W_lookup) if t is not None)

    def norm_coeff(self, x: torch.Tensor) -> torch.Tensor | None:
        """c(x) [..., 1] of constant_norm_rescale (SAELens: sqrt(d_in) / |x|), None without normalisation."""
        if self.normalize_activations == "none":
            return None
        return self.d_model ** 0.5 / x.norm(dim=-1, keepdim=True)

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        c = self.norm_coeff(x)
        if c is not None:
            x = x * c
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

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None,
               token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """f [..., d_sae] -> x_hat [..., d_model].

        x [..., d_model] (the encoded input) is needed by constant_norm_rescale, to undo its scale;
        token_ids [...] by tokenized SAEs, for their lookup bias.
        """
        x_hat = f @ self.W_dec + self.b_dec
        if self.normalize_activations != "none":
            if x is None:
                raise ValueError("decode of a constant_norm_rescale SAE needs the input x (its norm sets the scale)")
            x_hat = x_hat / self.norm_coeff(x)
        if self.W_lookup is not None:
            if token_ids is None:
                raise ValueError("decode of a tokenized SAE needs token_ids (W_lookup[token] is part of x_hat)")
            x_hat = x_hat + self.W_lookup[token_ids]
        return x_hat

    def edit_delta(self, x: torch.Tensor, change: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """x [T, d_model], change [T, n] (f' - f of `features` [n]) -> x' - x [T, d_model].

        Equals decode(f', x, t) - decode(f, x, t): b_dec and the token lookup cancel, the input
        scale of constant_norm_rescale does not.
        """
        delta = change @ self.W_dec[features]
        c = self.norm_coeff(x)
        return delta if c is None else delta / c

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (enc [d_sae, d_model], gate_bias, threshold, mag_scale, mag_bias [d_sae]): the packed form of
        the module docstring, which sae_steer.kernels evaluates for every architecture."""
        if self.normalize_activations != "none":  # a per-token scale of x: not a per-feature constant
            raise ValueError("the packed form has no per-token input scale (constant_norm_rescale)")
        b_dec_dot = self.b_dec @ self.W_enc if self.apply_b_dec_to_input else torch.zeros_like(self.b_enc)
        gated = self.architecture == "gated"
        mag_scale = torch.exp(self.r_mag) if gated else torch.ones_like(self.b_enc)
        threshold = self.threshold if self.architecture == "jumprelu" else torch.zeros_like(self.b_enc)
        mag_bias = (self.b_mag if gated else self.b_enc) - mag_scale * b_dec_dot
        return self.W_enc.T, self.b_enc - b_dec_dot, threshold, mag_scale, mag_bias

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
