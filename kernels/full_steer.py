"""Full-width encode of a TopK SAE segment: every feature, for the tokens that need it.

A TopK SAE keeps a feature only if its pre-activation is among the token's k largest, so its edits (and
`when` gates) need the whole encode. The layer's TopK SAEs are packed side by side in features [lo, hi) of
its dictionary (`table.LayerDictionary`); this encodes that range for a list of tokens:

    acts[t] = act(x_t @ enc[lo:hi].T)      [T, n] fp32, for t in rows[:count]   (other rows: not written)

and `sparse_steer` takes membership from acts (each token's k-th largest value per SAE, see there). The
list and its count are device tensors (the table's per-step buffer): programs past the count exit at
once, so a step in which no token needs the encode costs one launch that does nothing, inside a
replayed CUDA graph too. For TopK, relu(pre) ranks like pre, so ranking the activations ranks the
pre-activations (ties at zero give f = 0 either way).

How: a Triton kernel, the tiled `[count, d] x [d, n]` matmul of Triton's matmul tutorial, with x formed
from hidden + residual while loading (never materialized) and the activation fused on the accumulator.
The weights are read in the dtype the table holds them in: the serving dtype (bf16/fp16) runs on tensor
cores with fp32 accumulation, x rounded to that dtype for the product (as the model's own matmuls round
their inputs); fp32 weights use input_precision "ieee" (exact enough that membership matches an fp32
reference). Token tiles follow T (16 rows at decode, the minimum of tl.dot, up to 64).

Memory: acts is [T, n] fp32 (T=512, n=65k: 128 MiB). Callers with long prefill chunks and very wide SAEs
should split T.
"""
from __future__ import annotations

import torch

from .sparse_steer import HAS_TRITON, activation

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .sparse_steer import _activation


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------

def encode_reference(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo: int, hi: int):
    """-> acts [T, hi - lo] fp32: every feature of the segment, activated, for every token."""
    x = hidden.float() + residual.float()  # [T, d]
    feats = torch.arange(lo, hi, device=enc.device)  # [n]
    return activation(x @ enc[lo:hi].float().T, feats, gate_bias, threshold, mag_scale, mag_bias)


def encode_rows_torch(hidden, residual, rows, count, enc, gate_bias, threshold, mag_scale, mag_bias, lo: int,
                      hi: int):
    """encode_reference for the listed tokens rows[:count] only; the other rows of acts are 0."""
    acts = torch.zeros(hidden.shape[0], hi - lo)
    n = int(count)
    if n:
        listed = rows[:n].long()
        acts[listed] = encode_reference(hidden[listed], residual[listed], enc, gate_bias, threshold, mag_scale,
                                        mag_bias, lo, hi)
    return acts


# ---------------------------------------------------------------------------------------------
# Triton kernel: tiled encode with the activation fused
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    @triton.jit
    def _encode_kernel(
        hidden_ptr, residual_ptr, enc_ptr, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr, acts_ptr,
        rows_ptr, count_ptr, T, d, n, lo,
        stride_h, stride_r, stride_enc, stride_a, stride_rows,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):
        # grouped ordering (the matmul tutorial's "L2 cache optimizations")
        pid = tl.program_id(0)
        n_t, n_f = tl.cdiv(T, BLOCK_T), tl.cdiv(n, BLOCK_F)
        group = pid // (GROUP_T * n_f)
        first_t = group * GROUP_T
        group_size = min(n_t - first_t, GROUP_T)
        pid_t = first_t + (pid % (GROUP_T * n_f)) % group_size
        pid_f = (pid % (GROUP_T * n_f)) // group_size

        listed = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # positions in the token list
        if HAS_ROWS:  # a device count: inside a replayed CUDA graph, tiles past it do nothing
            count = tl.load(count_ptr)
            if pid_t * BLOCK_T >= count:
                return
            valid = listed < count
            rows = tl.load(rows_ptr + listed * stride_rows, mask=valid, other=0).to(tl.int64)
        else:
            valid = listed < T
            rows = listed.to(tl.int64)
        cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # features, local to the segment
        feat = (lo + cols).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + ks
            x_mask = valid[:, None] & (kk < d)[None, :]
            x = (tl.load(hidden_ptr + rows[:, None] * stride_h + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
                 + tl.load(residual_ptr + rows[:, None] * stride_r + kk[None, :], mask=x_mask, other=0.0)
                 .to(tl.float32))  # [BLOCK_T, BLOCK_K]
            w = tl.load(enc_ptr + feat[None, :] * stride_enc + kk[:, None],
                        mask=(cols < n)[None, :] & (kk < d)[:, None], other=0.0)  # [BLOCK_K, BLOCK_F]
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)

        # fused activation on the accumulator (the sparse kernel's, one home); masked features load index lo
        # (any valid row) and are not stored
        f_mask = cols < n
        feat = tl.where(f_mask, feat, lo)
        f = _activation(acc, feat[None, :], gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr)
        tl.store(acts_ptr + rows[:, None] * stride_a + cols[None, :], f, mask=valid[:, None] & f_mask[None, :])


def encode_triton(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo: int, hi: int,
                  rows: torch.Tensor | None = None, count: torch.Tensor | None = None):
    """Launch the encode: 1-D grid over (token tiles of T) x (feature tiles). -> acts [T, n] fp32.

    rows, count: a device token list and its length (int32); only those tokens' rows of acts are written
    (the others are left as torch.empty gives them). Without them every token is encoded."""
    T, d = hidden.shape
    n = hi - lo
    assert hidden.stride(1) == residual.stride(1) == 1 and enc.stride(1) == 1
    acts = torch.empty(T, n, dtype=torch.float32, device=hidden.device)
    if T == 0 or n == 0:
        return acts
    fp32 = enc.dtype == torch.float32
    # tl.dot wants every block dim >= 16; fp32 64x64x32 tiles fit the register file at 4 warps
    BLOCK_T = max(16, min(64, triton.next_power_of_2(T)))
    BLOCK_F, BLOCK_K = 64, 32 if fp32 else 64
    grid = (triton.cdiv(T, BLOCK_T) * triton.cdiv(n, BLOCK_F),)
    _encode_kernel[grid](
        hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, acts,
        acts if rows is None else rows, acts if count is None else count, T, d, n, lo,
        hidden.stride(0), residual.stride(0), enc.stride(0), acts.stride(0), 0 if rows is None else rows.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, GROUP_T=8, INPUT_PRECISION="ieee" if fp32 else "tf32",
        HAS_ROWS=rows is not None,
    )
    return acts
