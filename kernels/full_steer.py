"""Full-width steering: encode every feature of one SAE, for TopK SAEs and telemetry.

A TopK SAE keeps a feature only if its pre-activation is among the token's k largest, so its edits
(and `when` gates) need the whole encode; telemetry ("the top features of this token") needs it for
any architecture. The SAE occupies packed features [lo, hi) of the layer's dictionary
(`table.LayerDictionary`), so the same tensors as `sparse_steer` are passed, plus the segment:

    acts       = act(x @ enc[lo:hi].T)        [T, n]   fused activation (ReLU / JumpReLU / gated / TopK's ReLU)
    top        = topk(acts, max(k, top_k))    [T, K]   per token, sorted
    TopK SAE   f_i = value if i is among the first k of `top`, else 0
    hidden'    = the sparse edit + decode-delta epilogue, reading TopK features from `top`

How it is split: a Triton kernel does the tiled encode with the activation fused (the FLOPs and
the bytes of the full width), `torch.topk` selects (a fused in-kernel top-k merge across feature
tiles is left for later; torch's is one launch and graph-capturable), and the epilogue is the
sparse kernel (`sparse_steer`) with the top-k list as its TopK segment. For TopK,
relu(pre) ranks like pre, so the top-k of the activations is the top-k of the pre-activations
(ties at zero give f = 0 either way).

Memory: acts is [T, n] fp32 (T=512, n=65k: 128 MiB). Callers with long prefill chunks and very wide
SAEs should split T.
"""
from __future__ import annotations

import torch

from .sparse_steer import HAS_TRITON, TopkSegment, activation, sparse_steer_reference, sparse_steer_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .sparse_steer import _activation


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------

def encode_reference(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo: int, hi: int):
    """-> acts [T, hi - lo] fp32: every feature of the segment, activated."""
    x = hidden.float() + residual.float()  # [T, d]
    feats = torch.arange(lo, hi, device=enc.device)  # [n]
    return activation(x @ enc[lo:hi].T, feats, gate_bias, threshold, mag_scale, mag_bias)


def _select_and_steer(acts, steer, args, lo: int, hi: int, k: int | None, top_k: int):
    """The shared tail: top-k per token, the epilogue, telemetry. -> (hidden', indices, values)."""
    T, n = acts.shape
    K = min(max(k or 0, top_k), n)
    values, indices = acts.topk(K, dim=1)  # [T, K], sorted: the first k are a TopK SAE's live features
    segment = (lo, hi, indices[:, :k].contiguous(), values[:, :k].contiguous()) if k else None
    new_hidden = steer(*args, topk_segment=segment)
    values = values[:, :top_k]
    if k and top_k > k:  # a TopK SAE has at most k active features: the rest are 0
        values = values.masked_fill(torch.arange(values.shape[1], device=acts.device) >= k, 0.0)
    return new_hidden, indices[:, :top_k], values


def full_steer_reference(hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature, gate_above,
                         vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias, *, lo: int, hi: int,
                         k: int | None = None, top_k: int = 0):
    """Same arguments as `sparse_steer` plus the segment [lo, hi) (one SAE), its TopK `k` (None: not a
    TopK SAE) and the telemetry size `top_k`. -> (hidden' [T, d], indices [T, top_k] local to the SAE,
    values [T, top_k] fp32)."""
    args = (hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature, gate_above, vector,
            enc, dec, gate_bias, threshold, mag_scale, mag_bias)
    acts = encode_reference(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi)
    return _select_and_steer(acts, sparse_steer_reference, args, lo, hi, k, top_k)


# ---------------------------------------------------------------------------------------------
# Triton kernel: tiled encode with the activation fused
# ---------------------------------------------------------------------------------------------
#
# A [T, d] x [d, n] matmul in the layout of Triton's matmul tutorial: one program per
# [BLOCK_T, BLOCK_F] output tile, a loop over d in BLOCK_K steps with tl.dot, grouped ordering of
# the programs so that GROUP_T token tiles reuse each streamed enc tile from L2. x = hidden + residual
# is formed while loading (never materialized) and the activation runs on the accumulator before the
# one store. input_precision "ieee" keeps fp32 exact enough for top-k membership to match the
# reference; "tf32" is faster on tensor cores but may swap features near the k-th value.

if HAS_TRITON:
    @triton.jit
    def _encode_kernel(
        hidden_ptr, residual_ptr, enc_ptr, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr, acts_ptr,
        live_ptr, T, d, n, lo,
        stride_h, stride_r, stride_enc, stride_a,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, HAS_LIVE: tl.constexpr,
    ):
        if HAS_LIVE:  # a device flag: inside a replayed CUDA graph, skip the work when no request needs it
            if tl.load(live_ptr) == 0:
                return
        # grouped ordering (the matmul tutorial's "L2 cache optimizations")
        pid = tl.program_id(0)
        n_t, n_f = tl.cdiv(T, BLOCK_T), tl.cdiv(n, BLOCK_F)
        group = pid // (GROUP_T * n_f)
        first_t = group * GROUP_T
        group_size = min(n_t - first_t, GROUP_T)
        pid_t = first_t + (pid % (GROUP_T * n_f)) % group_size
        pid_f = (pid % (GROUP_T * n_f)) // group_size

        rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # tokens
        cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # features, local to the segment
        feat = (lo + cols).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + ks
            x_mask = (rows < T)[:, None] & (kk < d)[None, :]
            x = (tl.load(hidden_ptr + rows[:, None] * stride_h + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
                 + tl.load(residual_ptr + rows[:, None] * stride_r + kk[None, :], mask=x_mask, other=0.0)
                 .to(tl.float32))  # [BLOCK_T, BLOCK_K]
            w = tl.load(enc_ptr + feat[None, :] * stride_enc + kk[:, None],
                        mask=(cols < n)[None, :] & (kk < d)[:, None], other=0.0)  # [BLOCK_K, BLOCK_F]
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

        # fused activation on the accumulator (the sparse kernel's, one home); masked features load index lo
        # (any valid row) and are not stored
        f_mask = cols < n
        feat = tl.where(f_mask, feat, lo)
        f = _activation(acc, feat[None, :], gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr)
        tl.store(acts_ptr + rows[:, None] * stride_a + cols[None, :], f, mask=(rows < T)[:, None] & f_mask[None, :])


def encode_triton(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo: int, hi: int,
                  input_precision: str = "ieee", live: torch.Tensor | None = None):
    """Launch the encode: 1-D grid of cdiv(T, BLOCK_T) * cdiv(n, BLOCK_F) tiles. -> acts [T, n] fp32.

    live: an optional device int32 scalar; where it is 0 the kernel does nothing and acts stay 0 (the
    caller promises that no edit reads them: a graph-safe table skipping TopK SAEs nobody steers)."""
    T, d = hidden.shape
    n = hi - lo
    assert hidden.stride(1) == residual.stride(1) == 1 and enc.is_contiguous()
    acts = (torch.empty if live is None else torch.zeros)(T, n, dtype=torch.float32, device=hidden.device)
    if T == 0 or n == 0:
        return acts
    # tl.dot wants every block dim >= 16; 64x64x32 fp32 tiles fit the register file at 4 warps
    BLOCK_T = max(16, min(64, triton.next_power_of_2(T)))
    BLOCK_F, BLOCK_K = 64, 32
    grid = (triton.cdiv(T, BLOCK_T) * triton.cdiv(n, BLOCK_F),)
    _encode_kernel[grid](
        hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, acts,
        acts if live is None else live, T, d, n, lo,
        hidden.stride(0), residual.stride(0), enc.stride(0), acts.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, GROUP_T=8, INPUT_PRECISION=input_precision,
        HAS_LIVE=live is not None,
    )
    return acts


def full_steer_triton(hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature, gate_above,
                      vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias, *, lo: int, hi: int,
                      k: int | None = None, top_k: int = 0, input_precision: str = "ieee"):
    """Triton encode -> torch.topk -> Triton sparse epilogue. Same contract as `full_steer_reference`."""
    args = (hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature, gate_above, vector,
            enc, dec, gate_bias, threshold, mag_scale, mag_bias)
    acts = encode_triton(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi, input_precision)
    return _select_and_steer(acts, sparse_steer_triton, args, lo, hi, k, top_k)


# ---------------------------------------------------------------------------------------------
# dispatchers
# ---------------------------------------------------------------------------------------------

def encode(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo: int, hi: int,
           live: torch.Tensor | None = None) -> torch.Tensor:
    """-> acts [T, hi - lo] fp32 of packed features [lo, hi): Triton on CUDA, torch otherwise (which always
    encodes: `live` only lets the Triton kernel skip work whose result nobody reads)."""
    if HAS_TRITON and hidden.is_cuda:
        return encode_triton(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi, live=live)
    return encode_reference(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi)


def topk_segment(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias,
                 saes: list[tuple[int, int, int]], lo: int, hi: int, live: torch.Tensor | None = None) -> TopkSegment:
    """The live features of TopK SAEs packed side by side in [lo, hi), for `sparse_steer`'s topk_segment.

    saes: (lo_i, hi_i, k_i) of each SAE to encode, inside [lo, hi). Each is encoded in full and keeps its k_i
    largest activations; the lists are concatenated, indices local to lo. Features of [lo, hi) outside every
    listed SAE read as 0, so an SAE that no edit names may be left out. Shapes follow (T, sum k_i) only:
    no host sync, capturable in a CUDA graph. live: see `encode`."""
    indices, values = [], []
    for a, b, k in saes:
        top = encode(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, a, b, live).topk(k, dim=1)
        indices.append(top.indices + (a - lo))
        values.append(top.values)
    return lo, hi, torch.cat(indices, 1), torch.cat(values, 1)
