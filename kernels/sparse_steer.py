"""Sparse steering: encode only the edited features, edit them, add the decode delta. One launch per layer.

The math (the arguments are `sae_steer.vllm_plugin.table`'s packed layout; the activation's packed form is
derived in `sae_steer.sae`, SparseAutoencoder.packed):

    x        = hidden + residual                       [T, d]   the residual stream, in fp32
    s        = token_slot[t]                           0 = no steering (hidden passes through)
    for each edit e of slot s, with i = edit_feature[s, e] and g = gate_feature[s, e]:
        dot_i    = x . enc[i]
        f_i      = (dot_i + gate_bias[i] > threshold[i]) * relu(mag_scale[i] dot_i + mag_bias[i])
        change_e = ((edit_mul[s, e]) f_i + edit_add[s, e]) * (f_g > gate_above[s, e])     = f'_i - f_i
    hidden'  = hidden + sum_e change_e dec[i] + vector[s]

Padding edits name the null feature F (enc/dec rows zero, all biases zero, so f = 0 and change = 0)
and gate_above = -inf means "no `when`". TopK features cannot be encoded sparsely (membership
needs every pre-activation): `full_steer` encodes their SAE fully and passes the token's top-k
list here as `topk_segment`, which replaces f for the features of that SAE.

Top to bottom: the torch reference (fixed shapes, the math written plainly), the CPU fast path (one
matmul over the distinct features), the Triton kernel, the dispatcher. Both fast paths are tested
against the reference (tests/kernels/test_sparse_steer.py).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch reference serves every call
    HAS_TRITON = False

# (lo, hi, indices [T, K] local to the segment, values [T, K]): the live features of the TopK SAE(s)
# packed at features [lo, hi) (several TopK SAEs side by side: their lists concatenated, see
# full_steer.topk_segment); any feature of the segment not in a token's list has f = 0.
TopkSegment = tuple[int, int, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------

def activation(dot: torch.Tensor, feats: torch.Tensor, gate_bias: torch.Tensor, threshold: torch.Tensor,
               mag_scale: torch.Tensor, mag_bias: torch.Tensor) -> torch.Tensor:
    """dot [..., n] = x . enc[feats], feats [..., n] (or [n]) -> f [..., n] for every packed architecture."""
    gate_pre = dot + gate_bias[feats]
    return (gate_pre > threshold[feats]) * torch.relu(mag_scale[feats] * dot + mag_bias[feats])


def topk_lookup(f: torch.Tensor, feats: torch.Tensor, segment: TopkSegment) -> torch.Tensor:
    """f, feats [T, n] -> f with the features inside the TopK segment read from the token's top-k list."""
    lo, hi, indices, values = segment  # indices, values [T, K]
    hit = (feats - lo)[:, :, None] == indices[:, None, :]  # [T, n, K]
    f_seg = (hit * values[:, None, :].float()).sum(-1)  # [T, n]: the value where listed, else 0
    return torch.where((feats >= lo) & (feats < hi), f_seg, f)


def edit_change(dot, feats, token_slot, edit_mul, edit_add, gate_above, gate_bias, threshold, mag_scale, mag_bias,
                topk_segment: TopkSegment | None) -> torch.Tensor:
    """dot [T, 2E] = x . enc[feats] of each token's edits then gates -> change [T, E] = f' - f, 0 where the
    `when` gate is closed."""
    E = dot.shape[1] // 2
    f = activation(dot, feats, gate_bias, threshold, mag_scale, mag_bias)
    if topk_segment is not None:
        f = topk_lookup(f, feats, topk_segment)
    f_edit, f_gate = f[:, :E], f[:, E:]
    return (edit_mul[token_slot] * f_edit + edit_add[token_slot]) * (f_gate > gate_above[token_slot])


def sparse_steer_reference(hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature,
                           gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                           topk_segment: TopkSegment | None = None) -> torch.Tensor:
    """The math above, token by token as the kernel does it (each token gathers its slot's encoder and decoder
    rows). Every shape follows the inputs' shapes, never their values: it can be compiled with
    torch.compile(fullgraph=True) and captured in a CUDA graph, which makes it the graph-safe path where
    Triton is missing. Memory [T, 2E, d]: a test and fallback path, not the CPU hot path."""
    x = hidden.float() + residual.float()  # [T, d]
    E = edit_feature.shape[1]
    feats = torch.cat([edit_feature[token_slot], gate_feature[token_slot]], 1)  # [T, 2E]: edits, then gates
    dot = torch.einsum("td,tnd->tn", x, enc[feats])  # [T, 2E]
    change = edit_change(dot, feats, token_slot, edit_mul, edit_add, gate_above, gate_bias, threshold, mag_scale,
                         mag_bias, topk_segment)  # [T, E]
    delta = torch.einsum("te,ted->td", change, dec[feats[:, :E]]) + vector[token_slot]  # [T, d]
    steered = (hidden.float() + delta).to(hidden.dtype)  # one rounding, as the kernel does
    return torch.where((token_slot != 0)[:, None], steered, hidden)


def sparse_steer_distinct(hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature,
                          gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                          topk_segment: TopkSegment | None = None) -> torch.Tensor:
    """The CPU fast path: the same math with one matmul over the batch's distinct features (requests sharing
    a feature share its encoder row), in place of per-token gathers. torch.unique makes the shapes depend
    on the values: eager only (SteeringTable with graph_safe=False)."""
    x = hidden.float() + residual.float()  # [T, d]
    E = edit_feature.shape[1]
    feats = torch.cat([edit_feature[token_slot], gate_feature[token_slot]], 1)  # [T, 2E]: edits, then gates
    uniq, inv = torch.unique(feats, return_inverse=True)  # feats = uniq[inv]
    dot = (x @ enc[uniq].T).gather(1, inv)  # [T, 2E]
    change = edit_change(dot, feats, token_slot, edit_mul, edit_add, gate_above, gate_bias, threshold, mag_scale,
                         mag_bias, topk_segment)  # [T, E]
    coef = torch.zeros(x.shape[0], uniq.shape[0], device=x.device).scatter_add_(1, inv[:, :E], change)  # [T, U]
    delta = coef @ dec[uniq] + vector[token_slot]  # [T, d]
    steered = (hidden.float() + delta).to(hidden.dtype)
    return torch.where((token_slot != 0)[:, None], steered, hidden)


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per token, two passes over d
# ---------------------------------------------------------------------------------------------
#
# Pass 1 gathers the slot's edit and gate rows of `enc` ([E_PAD, BLOCK_D] tiles, one contiguous row
# each) and accumulates their dot products with x; the activation and the edit run on E values in
# registers; pass 2 gathers the `dec` rows and writes hidden + delta + vector, tile by tile. Splitting
# d over programs would make every program redo pass 1 (the whole encode), so a token's d stays in
# one program. Loads of padding edits (the null feature) are masked off: they cost no memory
# traffic, so the work follows the slot's real edits, never the SAE width. Every shape is read from
# device tensors (no host sync) and no buffer is allocated besides `out`: CUDA-graph friendly.

if HAS_TRITON:
    @triton.jit
    def _activation(dot, feat, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr):
        gate_pre = dot + tl.load(gate_bias_ptr + feat)
        mag = tl.load(mag_scale_ptr + feat) * dot + tl.load(mag_bias_ptr + feat)
        return tl.where(gate_pre > tl.load(threshold_ptr + feat), tl.maximum(mag, 0.0), 0.0)

    @triton.jit
    def _topk_lookup(f, feat, t, seg_idx_ptr, seg_val_ptr, seg_lo, seg_hi, seg_k, stride_seg_t,
                     SEG_K_PAD: tl.constexpr):
        j = tl.arange(0, SEG_K_PAD)
        listed = tl.load(seg_idx_ptr + t * stride_seg_t + j, mask=j < seg_k, other=-1)  # [K]
        value = tl.load(seg_val_ptr + t * stride_seg_t + j, mask=j < seg_k, other=0.0).to(tl.float32)
        hit = (feat - seg_lo)[:, None] == listed[None, :]  # [E, K]
        f_seg = tl.sum(tl.where(hit, value[None, :], 0.0), axis=1)
        return tl.where((feat >= seg_lo) & (feat < seg_hi), f_seg, f)

    @triton.jit
    def _sparse_steer_kernel(
        hidden_ptr, residual_ptr, out_ptr, token_slot_ptr,
        edit_feature_ptr, edit_mul_ptr, edit_add_ptr, gate_feature_ptr, gate_above_ptr, vector_ptr,
        enc_ptr, dec_ptr, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr,
        seg_idx_ptr, seg_val_ptr, seg_lo, seg_hi, seg_k, stride_seg_t,
        d, n_edits, null_feature,
        stride_h, stride_r, stride_o, stride_es, stride_ee, stride_v, stride_enc, stride_dec,
        E_PAD: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SEG: tl.constexpr, SEG_K_PAD: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)  # int64: t * stride overflows int32 on long batches
        slot = tl.load(token_slot_ptr + t)
        cols = tl.arange(0, BLOCK_D)
        if slot == 0:  # unsteered token: a plain copy, bit-exact
            for d0 in range(0, d, BLOCK_D):
                c = d0 + cols
                h = tl.load(hidden_ptr + t * stride_h + c, mask=c < d)
                tl.store(out_ptr + t * stride_o + c, h, mask=c < d)
        else:
            e = tl.arange(0, E_PAD)
            row = slot * stride_es + e * stride_ee
            feat = tl.load(edit_feature_ptr + row, mask=e < n_edits, other=null_feature)  # [E]
            gate = tl.load(gate_feature_ptr + row, mask=e < n_edits, other=null_feature)
            live, gated = feat != null_feature, gate != null_feature

            # pass 1: dot products of x with the edited and gating features' encoder rows
            dot_f = tl.zeros([E_PAD], dtype=tl.float32)
            dot_g = tl.zeros([E_PAD], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                c = d0 + cols
                x = (tl.load(hidden_ptr + t * stride_h + c, mask=c < d, other=0.0).to(tl.float32)
                     + tl.load(residual_ptr + t * stride_r + c, mask=c < d, other=0.0).to(tl.float32))
                w = tl.load(enc_ptr + feat[:, None] * stride_enc + c[None, :],
                            mask=live[:, None] & (c < d)[None, :], other=0.0)  # [E, BLOCK_D]
                dot_f += tl.sum(w * x[None, :], axis=1)
                w = tl.load(enc_ptr + gate[:, None] * stride_enc + c[None, :],
                            mask=gated[:, None] & (c < d)[None, :], other=0.0)
                dot_g += tl.sum(w * x[None, :], axis=1)

            # the edit, on E values: change = f' - f, zero where the `when` gate is closed
            f = _activation(dot_f, feat, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr)
            f_gate = _activation(dot_g, gate, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr)
            if HAS_SEG:
                f = _topk_lookup(f, feat, t, seg_idx_ptr, seg_val_ptr, seg_lo, seg_hi, seg_k, stride_seg_t,
                                 SEG_K_PAD)
                f_gate = _topk_lookup(f_gate, gate, t, seg_idx_ptr, seg_val_ptr, seg_lo, seg_hi, seg_k,
                                      stride_seg_t, SEG_K_PAD)
            mul = tl.load(edit_mul_ptr + row, mask=e < n_edits, other=0.0)
            add = tl.load(edit_add_ptr + row, mask=e < n_edits, other=0.0)
            above = tl.load(gate_above_ptr + row, mask=e < n_edits, other=float("-inf"))
            change = tl.where(f_gate > above, mul * f + add, 0.0)  # [E]

            # pass 2: hidden + sum_e change_e dec[feat_e] + vector[slot]
            for d0 in range(0, d, BLOCK_D):
                c = d0 + cols
                w = tl.load(dec_ptr + feat[:, None] * stride_dec + c[None, :],
                            mask=live[:, None] & (c < d)[None, :], other=0.0)  # [E, BLOCK_D]
                delta = tl.sum(change[:, None] * w, axis=0)
                delta += tl.load(vector_ptr + slot * stride_v + c, mask=c < d, other=0.0)
                h = tl.load(hidden_ptr + t * stride_h + c, mask=c < d, other=0.0)
                tl.store(out_ptr + t * stride_o + c, (h.to(tl.float32) + delta).to(h.dtype), mask=c < d)


def _block_d(d: int, e_pad: int) -> int:
    """The d tile: wide for few edits (long coalesced rows), narrow for many (the [E, BLOCK_D] tiles of
    pass 1 hold 2 * E_PAD * BLOCK_D fp32 values; 8192 keeps them in registers at 4 warps)."""
    return max(16, min(triton.next_power_of_2(d), 1024, 8192 // (2 * e_pad)))


def sparse_steer_triton(hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature,
                        gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                        topk_segment: TopkSegment | None = None) -> torch.Tensor:
    """Launch the kernel: grid = (T,). Same arguments and result as `sparse_steer_reference`."""
    T, d = hidden.shape
    E = edit_feature.shape[1]
    tables = (edit_feature, edit_mul, edit_add, gate_feature, gate_above)
    assert all(tb.shape == edit_feature.shape and tb.stride() == edit_feature.stride() for tb in tables), \
        "the five edit tables share one layout (slices of the table's [L, S, E] tensors are fine)"
    assert hidden.stride(1) == residual.stride(1) == vector.stride(1) == 1 and enc.is_contiguous() \
        and dec.is_contiguous(), "rows must be contiguous"
    out = torch.empty_like(hidden)
    if T == 0:
        return out
    if topk_segment is not None:
        seg_lo, seg_hi, seg_idx, seg_val = topk_segment
        assert seg_idx.stride() == seg_val.stride() and seg_idx.stride(1) == 1
        seg_k, stride_seg_t = seg_idx.shape[1], seg_idx.stride(0)
    else:  # any valid pointer: HAS_SEG=False compiles the lookup away
        seg_lo, seg_hi, seg_idx, seg_val, seg_k, stride_seg_t = 0, 0, edit_feature, edit_mul, 0, 0
    e_pad = max(2, triton.next_power_of_2(E))
    _sparse_steer_kernel[(T,)](
        hidden, residual, out, token_slot,
        edit_feature, edit_mul, edit_add, gate_feature, gate_above, vector,
        enc, dec, gate_bias, threshold, mag_scale, mag_bias,
        seg_idx, seg_val, seg_lo, seg_hi, seg_k, stride_seg_t,
        d, E, enc.shape[0] - 1,
        hidden.stride(0), residual.stride(0), out.stride(0), edit_feature.stride(0), edit_feature.stride(1),
        vector.stride(0), enc.stride(0), dec.stride(0),
        E_PAD=e_pad, BLOCK_D=_block_d(d, e_pad), HAS_SEG=topk_segment is not None,
        SEG_K_PAD=max(2, triton.next_power_of_2(seg_k)),
    )
    return out


# ---------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------

def sparse_steer(hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature, gate_above,
                 vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                 topk_segment: TopkSegment | None = None, fixed_shapes: bool = False) -> torch.Tensor:
    """hidden [T, d] -> hidden with each token's slot steering added: Triton on CUDA; elsewhere the
    distinct-features path, or the reference when fixed_shapes (compiled / captured graphs) asks.

    token_slot [T] int64; edit_feature, gate_feature [S, E] int64 (pad: null feature F);
    edit_mul (a - 1), edit_add (b), gate_above (-inf: no gate) [S, E] f32; vector [S, d] f32;
    enc, dec [F+1, d] f32; gate_bias, threshold, mag_scale, mag_bias [F+1] f32.
    """
    if HAS_TRITON and hidden.is_cuda:
        fn = sparse_steer_triton
    else:
        fn = sparse_steer_reference if fixed_shapes else sparse_steer_distinct
    return fn(hidden, residual, token_slot, edit_feature, edit_mul, edit_add, gate_feature, gate_above, vector,
              enc, dec, gate_bias, threshold, mag_scale, mag_bias, topk_segment)
