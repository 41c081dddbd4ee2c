"""Logit-space feature steering: the direct effect of SAE features on the logits, and the batched
per-request bias state that the logits processor adds to each step's logits.

The formula. For feature i of an SAE, u = W_dec[i] [d_model]; the model's final norm has gain g
[d_model] (RMSNorm: g = w; Gemma's RMSNorm: g = 1 + w; LayerNorm: g = w, and u is centered first,
u <- u - mean(u), since LayerNorm removes the mean); W_U [vocab, d_model] is the unembedding:

    l_i     = W_U (g * u)                        [vocab]  the feature's logit-lens direction
    e_i     = l_i / max_v |l_i[v]|               [vocab]  its unit direct effect
    bias    = sum_j strength_j * e_(i_j)         over the request's logit interventions
    logits' = logits + bias                      at every sampled token of that request

so `strength` is in logits: the token the feature moves most moves by exactly |strength|
(up for positive strength when that token is promoted), every other token in proportion.

Why this and not the exact change of the logits: the final norm is nonlinear. Adding s*u to the
final residual stream x changes the logits by W_U (g * ((x + s u)/sigma(x + s u) - x/sigma(x))),
which depends on x. To first order in s, and dropping the component along x (small for a
direction unrelated to x in high dimension), that is (s / sigma(x)) W_U (g * u): the direction
l_i at every token, only its size varies with the token, through 1/sigma(x). A logits processor
sees logits, not x, so the size is fixed by the normalization instead; exactly, the bias is what
adding (strength / max|l_i|) * u to the normalized stream x/sigma(x), before the gain, does.
The result does not depend on |W_dec[i]| or the SAE's scale, so strengths compare across
features and models, and the ranking of tokens is the feature's logit lens l_i (what the feature route
serves, through `head_of_checkpoint`). A LayerNorm's bias b adds the same W_U b to every
token's logits whatever the feature: it is no part of a direction, and only `LogitHead.logits`, the model's
own logits of a stream (the lens route), adds it.
"Direct" means the path straight from the stream to the unembedding: what the feature would do
through later layers is residual steering's business. Models whose logits are soft-capped
(Gemma 2) get the bias after the cap, on the logits the sampler sees. vLLM runs this before
temperature, penalties and top-k/p (like OpenAI's logit_bias), so temperature scales it too.

Batched state (LogitBias): one bias row per distinct logit steering among live requests, in a
table [max_rows, vocab] preallocated at startup (distinct steerings <= live rows, so it never
runs out; float32, max_num_seqs * vocab * 4 bytes: 6 MiB for 32 rows of SmolLM2's 49,152 tokens).
A row is computed once when its first request is added (update) and shared by identical ones;
`apply` adds the rows of the steered requests with one index_add_, and returns at once when no
request in the batch has logit steering, so unsteered rows are never touched.

This module has no vLLM import: the logits processor translates vLLM's BatchUpdate.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_steer.vllm_plugin.adapters import Family, family_of
from sae_steer.vllm_plugin.row_slots import RowSlots

# Rows of W_U converted to float32 at a time: bounded memory for large vocabularies.
_VOCAB_CHUNK = 8192


@dataclass(frozen=True)
class LogitHead:
    """The served model's unembedding [vocab, d_model] and final norm: its gain [d_model] (any dtype), and for
    the logits of a stream (`logits`, the lens route) its epsilon, a LayerNorm's bias and the logit soft-cap.
    Directions (`logit_lens`: logit steering, feature records) use the gain alone: a bias is no direction."""
    unembed: torch.Tensor
    gain: torch.Tensor
    centered: bool  # LayerNorm: the mean is removed before the gain
    eps: float | None = None  # the final norm's epsilon; None: a head of directions only (a bare W_U)
    norm_bias: torch.Tensor | None = None  # a LayerNorm's bias [d_model], added after the gain
    softcap: float | None = None  # Gemma 2: logits -> softcap * tanh(logits / softcap)

    def _unembed(self, h: torch.Tensor) -> torch.Tensor:
        """h [k, d_model] float32 -> W_U h per row, [k, vocab] float32 (W_U converted a chunk at a time)."""
        out = torch.empty(h.shape[0], self.unembed.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, self.unembed.shape[0], _VOCAB_CHUNK):
            out[:, start:start + _VOCAB_CHUNK] = h @ self.unembed[start:start + _VOCAB_CHUNK].float().T
        return out

    def logit_lens(self, directions: torch.Tensor) -> torch.Tensor:
        """directions [k, d_model] -> l = W_U (g * u) per direction, [k, vocab] float32."""
        u = directions.float().to(self.unembed.device)
        if self.centered:
            u = u - u.mean(dim=-1, keepdim=True)
        return self._unembed(u * self.gain.float())

    def logits(self, stream: torch.Tensor) -> torch.Tensor:
        """stream [n, d_model] (the residual stream after a layer) -> the model's logits of it, [n, vocab] float32:
        its final norm (its epsilon; LayerNorm: centered, plus its bias), the unembedding, the soft-cap."""
        if self.eps is None:
            raise ValueError("this LogitHead has no final norm (a bare unembedding): it cannot read a stream")
        x = stream.float().to(self.unembed.device)
        if self.centered:
            x = x - x.mean(dim=-1, keepdim=True)
        h = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.gain.float()
        if self.norm_bias is not None:
            h = h + self.norm_bias.float()
        out = self._unembed(h)
        return out if self.softcap is None else self.softcap * torch.tanh(out / self.softcap)

    def unit_effects(self, directions: torch.Tensor) -> torch.Tensor:
        """[k, d_model] -> e = l / max|l| per direction, [k, vocab] (a zero direction gives zeros)."""
        lens = self.logit_lens(directions)
        return lens / lens.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def bias(self, directions: torch.Tensor, strengths: list[float]) -> torch.Tensor:
        """sum_j strength_j * e_j: the logit bias of one request, [vocab] float32."""
        effects = self.unit_effects(directions)
        return torch.tensor(strengths, dtype=torch.float32, device=effects.device) @ effects


def _module(root: torch.nn.Module, path: str, what: str) -> torch.nn.Module:
    try:
        return operator.attrgetter(path)(root)
    except AttributeError:
        raise RuntimeError(f"sae-steer: {type(root).__name__} has no `{path}` ({what}): logit steering "
                           f"cannot find it (a vLLM change?)") from None


def _gain(weight: torch.Tensor | None, family: Family) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise RuntimeError(f"sae-steer: the final norm of this {family.name} model has no weight tensor")
    return 1.0 + weight.float() if family.head.norm == "rms1p" else weight


def _norm_bias(bias: torch.Tensor | None, family: Family) -> torch.Tensor | None:
    # RMSNorm has none; a LayerNorm without one (HF's bias=False, a checkpoint without it) adds zero.
    return bias if family.head.norm == "layer" and isinstance(bias, torch.Tensor) else None


def _eps_and_softcap(config, family: Family) -> tuple[float, float | None]:
    """The final norm's epsilon and the logit soft-cap (None: uncapped) of a transformers config."""
    eps = getattr(config, family.head.eps, None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise RuntimeError(f"sae-steer: the config of this {family.name} model has no `{family.head.eps}` (its "
                           f"final norm's epsilon)")
    return float(eps), getattr(config, "final_logit_softcapping", None)


def _head(unembed: torch.Tensor, gain: torch.Tensor, vocab: int, family: Family, config,  # config None: directions only
          norm_bias: torch.Tensor | None) -> LogitHead:
    if not unembed.is_floating_point() or unembed.dim() != 2 or unembed.shape[0] < vocab:
        raise RuntimeError(f"sae-steer: the unembedding of this {family.name} model is {unembed.dtype} "
                           f"{tuple(unembed.shape)}, not a float [vocab >= {vocab}, d_model] matrix (quantized?): "
                           f"logit steering cannot compute feature effects")
    eps, softcap = (None, None) if config is None else _eps_and_softcap(config, family)
    # vLLM pads the vocabulary of its LM head; the sampler's logits have the first `vocab` columns.
    return LogitHead(unembed=unembed[:vocab], gain=gain, centered=family.head.norm == "layer", eps=eps,
                     norm_bias=_norm_bias(norm_bias, family), softcap=softcap)


def head_of_vllm(model: torch.nn.Module, family: Family, vocab: int) -> LogitHead:
    """The LogitHead of a model vLLM has loaded (tensor parallel size 1: the head is not sharded), for directions
    only (logit steering): no epsilon or soft-cap is read, so no config key can keep an engine from starting."""
    unembed = _module(model, family.head.unembed, "the unembedding")
    norm = _module(model, family.head.final_norm, "the final norm")
    return _head(getattr(unembed, "weight", torch.empty(0)), _gain(getattr(norm, "weight", None), family), vocab,
                 family, None, getattr(norm, "bias", None))


def head_of_hf(model: torch.nn.Module, family: Family) -> LogitHead:
    """The LogitHead of a Hugging Face transformers causal LM (offline: feature records, references)."""
    norm = _module(model, family.head.hf_final_norm, "the final norm")
    unembed = model.get_output_embeddings().weight
    return _head(unembed, _gain(getattr(norm, "weight", None), family), unembed.shape[0], family, model.config,
                 getattr(norm, "bias", None))


def head_of_checkpoint(model_dir: str | Path) -> LogitHead:
    """The LogitHead of a Hugging Face model folder, read from its safetensors by the family's own names
    (the API server, which has no model object: the feature route's and the lens route's logit lens), the
    norm's epsilon and the soft-cap from its config (transformers' defaults for keys it lacks). The tensors
    keep their dtype (LogitHead converts W_U in chunks). A ValueError names what it cannot find."""
    from safetensors import safe_open
    from transformers import AutoConfig
    model_dir = Path(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model's config.json in {model_dir} ({e})") from None
    family = family_of(config.architectures)
    # Tied checkpoints (GPT-2, Gemma, small Qwen) store no unembedding: the input embedding is it.
    tied = config.tie_word_embeddings
    file_of = {}  # tensor name -> the safetensors file holding it (headers only: nothing is loaded yet)
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            file_of.update(dict.fromkeys(f.keys(), file))

    def name_of(path: str, tensor: str = "weight") -> str | None:
        # A checkpoint of the base model alone names it without the prefix (GPT-2's own: ln_f, wte).
        return next((k for k in (f"{path}.{tensor}", f"{path.partition('.')[2]}.{tensor}") if k in file_of), None)

    def load(name: str) -> torch.Tensor:
        with safe_open(str(file_of[name]), framework="pt") as f:
            return f.get_tensor(name)

    head = family.head
    norm = name_of(head.hf_final_norm)
    unembed = name_of(head.hf_unembed) or (name_of(head.hf_embed) if tied else None)
    missing = [] if norm else [f"`{head.hf_final_norm}.weight` (the final norm)"]
    if not unembed:
        missing.append(f"`{head.hf_unembed}.weight`" + (f" or `{head.hf_embed}.weight`" if tied else "")
                       + " (the unembedding)")
    if missing:
        raise ValueError(f"the safetensors in {model_dir} have no {' and no '.join(missing)}, where a "
                         f"{family.name} checkpoint keeps them")
    W_U = load(unembed)
    bias = name_of(head.hf_final_norm, "bias")
    return _head(W_U, _gain(load(norm), family), W_U.shape[0], family, config, load(bias) if bias else None)


class LogitBias:
    """Per-request logit biases for the rows of vLLM's persistent batch.

    Keys are hashable descriptions of a request's logit steering (equal keys share one bias row:
    row_slots.RowSlots); `bias_of(key)` computes that row [vocab] the first time a key is seen among live
    requests."""

    def __init__(self, max_rows: int, vocab: int, device: torch.device | str):
        self.table = torch.zeros(max_rows, vocab, dtype=torch.float32, device=device)
        self.rows = RowSlots(max_rows, range(max_rows), none=-1)  # row -> table row (-1: no logit steering)
        # The steered rows and their table rows, on the device: rebuilt when the batch changes.
        self._steered_rows = torch.zeros(0, dtype=torch.long, device=device)
        self._steered_slots = torch.zeros(0, dtype=torch.long, device=device)

    def update(self, added: list[tuple[int, Hashable | None]], removed: list[int],
               moved: list[tuple[int, int, bool]], bias_of: Callable[[Hashable], torch.Tensor]) -> None:
        """added: (row, key or None); moved: (a, b, swap). vLLM's order: removed, added, moved; an added
        or moved-to row replaces whatever the row held."""
        def write(slot: int, key: Hashable) -> None:
            self.table[slot] = bias_of(key)

        if self.rows.update([(row, key, None) for row, key in added], removed, moved, write):
            steered = [(r, s) for r, s in enumerate(self.rows.row_slot) if s >= 0]
            device = self.table.device
            self._steered_rows = torch.tensor([r for r, _ in steered], dtype=torch.long).to(device, non_blocking=True)
            self._steered_slots = torch.tensor([s for _, s in steered], dtype=torch.long).to(device, non_blocking=True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [num_rows, vocab] float32, in place: steered rows += their bias; others untouched."""
        if self._steered_rows.numel() == 0:
            return logits
        return logits.index_add_(0, self._steered_rows, self.table[self._steered_slots])
