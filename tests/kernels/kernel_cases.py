"""Random inputs for the kernel tests: a LayerDictionary packing all four SAE architectures, slot tables
laid out as SteeringTable lays them out, and a mask of the tokens whose result is decided by fp32 noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_steer.kernels.sparse_steer import activation, topk_lookup
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
    token_slot: torch.Tensor  # [T]
    edit_feature: torch.Tensor  # [S, E], strided like a slice of the table's [L, S, max_edits] tensors
    edit_mul: torch.Tensor
    edit_add: torch.Tensor
    gate_feature: torch.Tensor
    gate_above: torch.Tensor
    vector: torch.Tensor  # [S, d]
    dic: LayerDictionary

    def args(self, device=DEVICE) -> tuple:
        """The positional arguments of sparse_steer / full_steer, on `device`."""
        D = self.dic
        tensors = (self.hidden, self.residual, self.token_slot, self.edit_feature, self.edit_mul, self.edit_add,
                   self.gate_feature, self.gate_above, self.vector, D.enc, D.dec, D.gate_bias, D.threshold,
                   D.mag_scale, D.mag_bias)
        return tuple(t.to(device) for t in tensors)


def random_case(dic: LayerDictionary, T: int, E: int, dtype=torch.float32, n_slots: int = 5, seed: int = 0,
                features: tuple[int, int] | None = None) -> Case:
    """T tokens over n_slots slots (slot 0 = unsteered, about one token in four); each slot has 0..E real
    edits (the rest null padding), a third of them gated by `when`, and half the slots a vector.
    `features` = (lo, hi) draws edited and gating features from that range only."""
    g = torch.Generator().manual_seed(seed)
    d, null = dic.enc.shape[1], dic.null
    lo, hi = features or (0, null)
    full = lambda value, dt: torch.full((2, n_slots, E + 3), value, dtype=dt)  # noqa: E731  [L, S, max_edits]
    ef, gf = full(null, torch.int64), full(null, torch.int64)
    em, ea, ga = full(0.0, torch.float32), full(0.0, torch.float32), full(float("-inf"), torch.float32)
    vector = torch.zeros(n_slots, d)
    for s in range(1, n_slots):
        n = int(torch.randint(0, E + 1, (1,), generator=g)) if s > 1 else E  # slot 1 always uses all E
        ef[1, s, :n] = torch.randint(lo, hi, (n,), generator=g)
        em[1, s, :n] = torch.rand(n, generator=g) * 2.5 - 1.5  # a - 1 for a in [-0.5, 2): scale, clamp, ablate
        ea[1, s, :n] = torch.randn(n, generator=g) * 2
        gated = torch.rand(n, generator=g) < 1 / 3
        gf[1, s, :n][gated] = torch.randint(lo, hi, (int(gated.sum()),), generator=g)
        ga[1, s, :n][gated] = torch.rand(int(gated.sum()), generator=g) * 0.5
        if s % 2:
            vector[s] = torch.randn(d, generator=g) * 0.5
    slot = torch.randint(1, n_slots, (T,), generator=g)
    slot[torch.rand(T, generator=g) < 0.25] = 0
    return Case(hidden=torch.randn(T, d, generator=g).to(dtype), residual=torch.randn(T, d, generator=g).to(dtype),
                token_slot=slot, edit_feature=ef[1, :, :E], edit_mul=em[1, :, :E], edit_add=ea[1, :, :E],
                gate_feature=gf[1, :, :E], gate_above=ga[1, :, :E], vector=vector, dic=dic)


def decisive_tokens(case: Case, segment=None) -> torch.Tensor:
    """bool [T]: tokens with every threshold, `when` gate (and TopK membership, via `segment` computed in
    float64 by the caller) farther than MARGIN from its boundary."""
    D, slot, E = case.dic, case.token_slot, case.edit_feature.shape[1]
    x = case.hidden.double() + case.residual.double()
    feats = torch.cat([case.edit_feature[slot], case.gate_feature[slot]], 1)  # [T, 2E]
    dot = torch.einsum("td,tnd->tn", x, D.enc.double()[feats])
    near_jump = ((dot + D.gate_bias.double()[feats] - D.threshold.double()[feats]).abs() < MARGIN) & (feats != D.null)
    f = activation(dot, feats, *(p.double() for p in (D.gate_bias, D.threshold, D.mag_scale, D.mag_bias)))
    if segment is not None:
        f = topk_lookup(f, feats, segment)
    near_when = (f[:, E:] - case.gate_above[slot].double()).abs() < MARGIN
    return ~(near_jump.any(1) | near_when.any(1))
