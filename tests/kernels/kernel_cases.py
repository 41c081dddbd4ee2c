"""Random inputs for the kernel tests: a LayerDictionary packing all four SAE architectures, slot tables
laid out as SteeringTable lays them out, and a mask of the tokens whose result is decided by fp32 noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_steer.kernels.sparse_steer import WINDOW_END, activation, topk_lookup
from sae_steer.tiny_model import random_sae
from sae_steer.vllm_plugin.table import LayerDictionary

# Real kernels on a GPU, the interpreter on CPU (conftest.py switches it on before the kernels are imported).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

ARCHS = ("relu", "jumprelu", "gated", "topk")
TOPK_K = 6

# JumpReLU/gated activations and `when` gates jump at a threshold, and a TopK SAE's membership flips at
# the k-th value: where the exact (float64) value lies this close to its boundary, two correct fp32
# summation orders may land on different sides. Such tokens are left out of the comparisons (fp32
# dot products here are ~10 in size with ~1e-6 error: 1e-3 is a wide safety margin).
MARGIN = 1e-3

# Tolerances of kernel vs reference, both computing in fp32 with different summation orders:
#   fp32: dots of ~10 carry ~1e-6 error, times |a - 1| <= 1.5, summed over up to 64 unit decoder rows.
#   bf16/fp16: both round the same fp32 value once; fp32 noise may tip it to the neighbouring value,
#   one ulp apart: at most 2^-7 (bf16, 8 significant bits) / 2^-10 (fp16, 11) relative; doubled.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2 ** -6, atol=1e-4),
              torch.float16: dict(rtol=2 ** -9, atol=1e-4)}


def dictionary(d: int, widths=(24, 20, 16, 40), seed: int = 0) -> tuple[LayerDictionary, dict]:
    """All four architectures at one layer, packed in ARCHS order; the TopK SAE has k = TOPK_K."""
    saes = {arch: random_sae(d, w, 1, arch, k=TOPK_K, seed=seed + i) for i, (arch, w) in enumerate(zip(ARCHS, widths))}
    return LayerDictionary(saes, d, torch.device("cpu")), saes


@dataclass
class Case:
    hidden: torch.Tensor  # [T, d] in the case's dtype
    residual: torch.Tensor
    positions: torch.Tensor  # [T] int64
    tokens: torch.Tensor  # [T, 3] int32: slot, window start, window end
    slot_edits: torch.Tensor  # [S] int32: live edits per slot (-1: idle at the layer)
    token_slot: torch.Tensor  # [T]: the slot where the token is steered, else 0 (what the kernels derive)
    edit_feature: torch.Tensor  # [S, E], strided like a slice of the table's [L, S, max_edits] tensors
    edit_mul: torch.Tensor
    edit_add: torch.Tensor
    gate_feature: torch.Tensor
    gate_above: torch.Tensor
    vector: torch.Tensor  # [S, d]
    dic: LayerDictionary

    def args(self, device=DEVICE) -> tuple:
        """The positional arguments of sparse_steer, on `device`."""
        D = self.dic
        tensors = (self.hidden, self.residual, self.positions, self.tokens, self.slot_edits, self.edit_feature,
                   self.edit_mul, self.edit_add, self.gate_feature, self.gate_above, self.vector, D.enc, D.dec,
                   D.gate_bias, D.threshold, D.mag_scale, D.mag_bias)
        return tuple(t.to(device) for t in tensors)


def random_case(dic: LayerDictionary, T: int, E: int, dtype=torch.float32, n_slots: int = 6, seed: int = 0,
                features: tuple[int, int] | None = None) -> Case:
    """T tokens over n_slots slots (slot 0 = unsteered, about one token in four); each slot has 0..E live
    edits, a third of them gated by `when`, and half the slots a vector. Past each slot's live edits the
    tables hold real features (not padding): the kernels must stop at the count. The last slot is idle at
    this layer (slot_edits -1). Each token has a positions window (all, prompt or generated) that excludes
    some. `features` = (lo, hi) draws edited and gating features from that range only."""
    g = torch.Generator().manual_seed(seed)
    d, null = dic.enc.shape[1], dic.null
    lo, hi = features or (0, null)
    W = E + 3  # [L, S, max_edits]: the kernels get [:, :E] views
    ef, gf = torch.randint(lo, hi, (2, n_slots, W), generator=g), torch.full((2, n_slots, W), null)
    em, ea = torch.rand(2, n_slots, W, generator=g) * 2.5 - 1.5, torch.randn(2, n_slots, W, generator=g) * 2
    ga = torch.full((2, n_slots, W), float("-inf"))
    slot_edits = torch.full((n_slots,), -1, dtype=torch.int32)
    vector = torch.zeros(n_slots, d)
    for s in range(1, n_slots - 1):
        n = int(torch.randint(0, E + 1, (1,), generator=g)) if s > 1 else E  # slot 1 always uses all E
        slot_edits[s] = n
        gated = torch.rand(n, generator=g) < 1 / 3
        gf[1, s, :n][gated] = torch.randint(lo, hi, (int(gated.sum()),), generator=g)
        ga[1, s, :n][gated] = torch.rand(int(gated.sum()), generator=g) * 0.5
        if s % 2:
            vector[s] = torch.randn(d, generator=g) * 0.5
    vector[n_slots - 1] = 1.0  # idle at the layer: never added
    slot = torch.randint(1, n_slots, (T,), generator=g)
    slot[torch.rand(T, generator=g) < 0.25] = 0
    positions = torch.randint(0, 30, (T,), generator=g)
    prompt_len = torch.randint(0, 30, (T,), generator=g)
    mode = torch.randint(0, 4, (T,), generator=g)  # all (twice as likely), prompt, generated
    start = torch.where(mode == 3, prompt_len, 0)
    end = torch.where(mode == 2, prompt_len, WINDOW_END)
    tokens = torch.stack([slot, start, end], 1).to(torch.int32)
    inside = (positions >= start) & (positions < end) & (slot_edits[slot] >= 0)
    return Case(hidden=torch.randn(T, d, generator=g).to(dtype), residual=torch.randn(T, d, generator=g).to(dtype),
                positions=positions, tokens=tokens, slot_edits=slot_edits, token_slot=torch.where(inside, slot, 0),
                edit_feature=ef[1, :, :E], edit_mul=em[1, :, :E], edit_add=ea[1, :, :E], gate_feature=gf[1, :, :E],
                gate_above=ga[1, :, :E], vector=vector, dic=dic)


def decisive_tokens(case: Case, topk=None) -> torch.Tensor:
    """bool [T]: tokens with every threshold, `when` gate (and TopK membership, via `topk` computed in
    float64 by the caller) of their live edits farther than MARGIN from its boundary."""
    D, slot, E = case.dic, case.token_slot, case.edit_feature.shape[1]
    x = case.hidden.double() + case.residual.double()
    live = torch.arange(E) < case.slot_edits[slot].clamp(min=0)[:, None]
    feats = torch.cat([torch.where(live, case.edit_feature[slot], D.null), torch.where(live, case.gate_feature[slot], D.null)], 1)
    dot = torch.einsum("td,tnd->tn", x, D.enc.double()[feats])
    near_jump = ((dot + D.gate_bias.double()[feats] - D.threshold.double()[feats]).abs() < MARGIN) & (feats != D.null)
    f = activation(dot, feats, *(p.double() for p in (D.gate_bias, D.threshold, D.mag_scale, D.mag_bias)))
    if topk is not None:
        f = topk_lookup(f, feats, topk)
    near_when = (f[:, E:] - case.gate_above[slot].double()).abs() < MARGIN
    return ~(near_jump.any(1) | near_when.any(1))
