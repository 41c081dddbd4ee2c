"""Sparse steering: encode only the edited features, edit them, add the decode delta. One launch per layer.

The math (the arguments are `sae_steer.vllm_plugin.table`'s packed layout; the activation's packed form is
derived in `sae_steer.sae`, SparseAutoencoder.packed):

    s        = tokens[t, 0]                  the token's slot; 0 = no steering (hidden passes through)
    steered  = s != 0  and  tokens[t, 1] <= positions[t] < tokens[t, 2]  and  slot_edits[s] >= 0
               (the window folds the request's `positions` mode in: [0, prompt_len), [prompt_len, inf) or all;
               slot_edits[s] = -1: the slot touches nothing at this layer)
    x        = hidden + residual                       [T, d]   the residual stream, in fp32
    for each of the slot's live edits e < slot_edits[s], with i = edit_feature[s, e] and g = gate_feature[s, e]:
        dot_i    = x . enc[i]
        f_i      = (dot_i + gate_bias[i] > threshold[i]) * relu(mag_scale[i] dot_i + mag_bias[i])
        change_e = ((edit_mul[s, e]) f_i + edit_add[s, e]) * (f_g > gate_above[s, e])     = f'_i - f_i
    hidden'  = hidden + sum_e change_e dec[i] + vector[s]

Absent gates name the null feature F (enc/dec rows zero, all biases zero, so f = 0) with gate_above = -inf
("no `when`"). TopK features cannot be encoded sparsely (membership needs every pre-activation): the
caller encodes the layer's TopK SAEs fully for the tokens that need it (`full_steer.encode`) and passes
`topk = (acts, saes, lo)`: acts [T, n] the activations of packed features [lo, lo + n), saes [N, 3] the
(lo_i, hi_i, k_i) of each TopK SAE there. A TopK feature i of SAE j is then

        f_i = acts[t, i] if acts[t, i] >= kth_t(j) else 0,    kth_t(j) = the k_j-th largest of acts[t, lo_j:hi_j]

so ties at the k-th value are all kept (a token may then have more than k live features; with real-valued
activations a tie has probability zero, and tied features carry the same value).

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
except ImportError:  # CPU-only installs: the torch paths serve every call
    HAS_TRITON = False

# (acts [T, n] fp32, saes [N, 3] int (lo_i, hi_i, k_i) in packed indices, lo): a layer's TopK SAEs, encoded
TopkActs = tuple[torch.Tensor, torch.Tensor, int]
WINDOW_END = 2 ** 31 - 1  # tokens[t, 2] of a request steered at every position


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------

def activation(dot: torch.Tensor, feats: torch.Tensor, gate_bias: torch.Tensor, threshold: torch.Tensor,
               mag_scale: torch.Tensor, mag_bias: torch.Tensor) -> torch.Tensor:
    """dot [..., n] = x . enc[feats], feats [..., n] (or [n]) -> f [..., n] for every packed architecture."""
    gate_pre = dot + gate_bias[feats]
    return (gate_pre > threshold[feats]) * torch.relu(mag_scale[feats] * dot + mag_bias[feats])


def token_slots(positions: torch.Tensor, tokens: torch.Tensor, slot_edits: torch.Tensor) -> torch.Tensor:
    """[T]: each token's slot where it is steered at this layer (see the module docstring), else 0."""
    slot = tokens[:, 0].long()
    inside = (positions >= tokens[:, 1]) & (positions < tokens[:, 2]) & (slot_edits[slot] >= 0)
    return torch.where(inside, slot, 0)


def topk_lookup(f: torch.Tensor, feats: torch.Tensor, topk: TopkActs) -> torch.Tensor:
    """f, feats [T, n] -> f with the TopK features read from acts where they reach their SAE's k-th value."""
    acts, saes, lo = topk
    for a, b, k in saes.tolist():
        kth = acts[:, a - lo:b - lo].topk(k, dim=1).values[:, k - 1:]  # [T, 1]
        inside = (feats >= a) & (feats < b)
        value = acts.gather(1, torch.where(inside, feats - lo, 0))
        f = torch.where(inside, torch.where(value >= kth, value, 0.0), f)
    return f


def _live_edits(edit_feature, gate_feature, token_slot, slot_edits):
    """[T, 2E] features of each token's edits then gates, the null feature past the slot's live edits."""
    E = edit_feature.shape[1]
    live = torch.arange(E, device=edit_feature.device) < slot_edits[token_slot].clamp(min=0)[:, None]  # [T, E]
    feats = torch.cat([edit_feature[token_slot], gate_feature[token_slot]], 1)
    return feats, torch.cat([live, live], 1)


def edit_change(dot, feats, live, token_slot, edit_mul, edit_add, gate_above, gate_bias, threshold, mag_scale,
                mag_bias, topk: TopkActs | None) -> torch.Tensor:
    """dot [T, 2E] = x . enc[feats] of each token's edits then gates -> change [T, E] = f' - f, 0 where the
    `when` gate is closed or the edit is past the slot's live edits (live [T, 2E]; None: all are live)."""
    E = dot.shape[1] // 2
    f = activation(dot, feats, gate_bias, threshold, mag_scale, mag_bias)
    if topk is not None:
        f = topk_lookup(f, feats, topk)
    f_edit, f_gate = f[:, :E], f[:, E:]
    change = (edit_mul[token_slot] * f_edit + edit_add[token_slot]) * (f_gate > gate_above[token_slot])
    return change if live is None else torch.where(live[:, :E], change, 0.0)


def sparse_steer_reference(hidden, residual, positions, tokens, slot_edits, edit_feature, edit_mul, edit_add,
                           gate_feature, gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                           topk: TopkActs | None = None) -> torch.Tensor:
    """The math above, token by token as the kernel does it (each token gathers its slot's encoder and decoder
    rows). Memory [T, 2E, d]: a test path, not a hot path."""
    token_slot = token_slots(positions, tokens[: hidden.shape[0]], slot_edits)
    x = hidden.float() + residual.float()  # [T, d]
    E = edit_feature.shape[1]
    feats, live = _live_edits(edit_feature, gate_feature, token_slot, slot_edits)
    dot = torch.einsum("td,tnd->tn", x, enc[feats].float())  # [T, 2E]
    change = edit_change(dot, feats, live, token_slot, edit_mul, edit_add, gate_above, gate_bias, threshold,
                         mag_scale, mag_bias, topk)  # [T, E]
    delta = torch.einsum("te,ted->td", change, dec[feats[:, :E]].float()) + vector[token_slot]  # [T, d]
    steered = (hidden.float() + delta).to(hidden.dtype)  # one rounding, as the kernel does
    return torch.where((token_slot != 0)[:, None], steered, hidden)


def sparse_steer_distinct(hidden, residual, positions, tokens, slot_edits, edit_feature, edit_mul, edit_add,
                          gate_feature, gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                          topk: TopkActs | None = None) -> torch.Tensor:
    """The CPU fast path: the same math on the steered tokens only, with one matmul over the batch's distinct
    features (requests sharing a feature share its encoder row), the edit tables cut to the widest live slot.
    Shapes depend on values (torch.unique, the steered tokens): it runs inside the registered op
    `sae_steer_kernels::steer` (kernels/ops.py), which torch.compile treats as opaque."""
    token_slot = token_slots(positions, tokens[: hidden.shape[0]], slot_edits)
    steered = token_slot.nonzero().flatten()
    n = steered.numel()
    if n == 0:
        return hidden.clone()
    every = n == hidden.shape[0]  # a whole decode batch steered: no gathers of the steered tokens
    slot = token_slot if every else token_slot[steered]
    counts = slot_edits[slot]
    E = int(counts.max())
    h = hidden if every else hidden[steered]
    delta = vector[slot]  # [n, d] (a copy: indexing gathers)
    if E > 0:
        x = h.float() + (residual if every else residual[steered]).float()  # [n, d]
        edit_feature, gate_feature = edit_feature[:, :E], gate_feature[:, :E]
        if bool((counts < E).any()):  # some slot has fewer live edits: mask the rest
            feats, live = _live_edits(edit_feature, gate_feature, slot, slot_edits)
        else:
            feats, live = torch.cat([edit_feature[slot], gate_feature[slot]], 1), None
        uniq, inv = torch.unique(feats, return_inverse=True)  # feats = uniq[inv]
        dot = (x @ enc[uniq].float().T).gather(1, inv)  # [n, 2E]
        if topk is not None:  # only where an edit or gate names a TopK feature (the k-th values cost a sort)
            acts, saes, topk_lo = topk
            named = bool(((feats >= topk_lo) & (feats < topk_lo + acts.shape[1])).any())
            topk = None if not named else (acts if every else acts[steered], saes, topk_lo)
        change = edit_change(dot, feats, live, slot, edit_mul[:, :E], edit_add[:, :E], gate_above[:, :E], gate_bias,
                             threshold, mag_scale, mag_bias, topk)  # [n, E]
        coef = torch.zeros(n, uniq.shape[0], device=x.device).scatter_add_(1, inv[:, :E], change)  # [n, U]
        delta += coef @ dec[uniq].float()
    steered_rows = (h.float() + delta).to(hidden.dtype)
    if every:
        return steered_rows
    out = hidden.clone()
    out[steered] = steered_rows
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per token, one pass over the slot's live edits
# ---------------------------------------------------------------------------------------------
#
# A program holds its token's row of the stream in registers (BLOCK_D >= d) and loops over the slot's live
# edits only (slot_edits[s], read on the device): per edit, one whole-row load of enc[i] (and of enc[g] when
# gated; an absent gate is a masked load that touches no memory), the activation and the edit on scalars,
# and one whole-row load of dec[i] accumulated into the delta. An unsteered token (slot 0, outside its
# window, or a slot idle at this layer) is a plain copy, bit-exact: a layer nobody steers costs one
# launch that copies the stream, nothing that grows with the table or the SAE widths. Every shape is read
# from device tensors (no host sync) and no buffer is allocated besides `out`: CUDA-graph friendly.
#
# TopK features read acts (the caller's full encode) and compare with the k-th largest value of their SAE's
# row, found by bisection on the bits of the (non-negative) fp32 activations: 31 counting passes over the
# row, all from L2, and only for the tokens and edits that name a TopK feature.

if HAS_TRITON:
    @triton.jit
    def _activation(dot, feat, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr):
        gate_pre = dot + tl.load(gate_bias_ptr + feat)
        mag = tl.load(mag_scale_ptr + feat) * dot + tl.load(mag_bias_ptr + feat)
        return tl.where(gate_pre > tl.load(threshold_ptr + feat), tl.maximum(mag, 0.0), 0.0)

    @triton.jit
    def _topk_value(i, t, acts_ptr, stride_a, topk_saes_ptr, topk_lo, N_TOPK: tl.constexpr, BLOCK_F: tl.constexpr):
        """f of TopK feature i for token t: acts[t, i] where it reaches its SAE's k-th largest, else 0."""
        a_lo = i * 0
        a_hi = i * 0
        k = i * 0
        for j in tl.static_range(N_TOPK):
            lo_j = tl.load(topk_saes_ptr + 3 * j)
            hi_j = tl.load(topk_saes_ptr + 3 * j + 1)
            inside = (i >= lo_j) & (i < hi_j)
            a_lo = tl.where(inside, lo_j, a_lo)
            a_hi = tl.where(inside, hi_j, a_hi)
            k = tl.where(inside, tl.load(topk_saes_ptr + 3 * j + 2), k)
        row = acts_ptr + t * stride_a + (a_lo - topk_lo)
        n = a_hi - a_lo
        # invariant: count(acts >= bits lo_b) >= k > count(acts >= bits hi_b); fp32 >= 0 orders like its bits
        lo_b = (t * 0).to(tl.int32)
        hi_b = lo_b + 0x7F800001  # just above +inf
        for _ in range(31):
            mid = lo_b + (hi_b - lo_b) // 2
            count = lo_b * 0
            for f0 in range(0, n, BLOCK_F):
                f = f0 + tl.arange(0, BLOCK_F)
                bits = tl.load(row + f, mask=f < n, other=-1.0).to(tl.int32, bitcast=True)
                count += tl.sum(((bits >= mid) & (f < n)).to(tl.int32), axis=0)
            take = count >= k
            lo_b = tl.where(take, mid, lo_b)
            hi_b = tl.where(take, hi_b, mid)
        kth = lo_b.to(tl.float32, bitcast=True)
        value = tl.load(acts_ptr + t * stride_a + (i - topk_lo))
        return tl.where(value >= kth, value, 0.0)

    @triton.jit
    def _feature(x, c, d_load, i, t, enc_ptr, stride_enc, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr,
                 acts_ptr, stride_a, topk_saes_ptr, topk_lo, topk_hi, N_TOPK: tl.constexpr, BLOCK_F: tl.constexpr):
        """f_i of token t (x its stream row in registers); d_load = 0 for the null feature: no memory read."""
        if N_TOPK > 0:
            if (i >= topk_lo) & (i < topk_hi):
                f = _topk_value(i, t, acts_ptr, stride_a, topk_saes_ptr, topk_lo, N_TOPK, BLOCK_F)
            else:
                w = tl.load(enc_ptr + i * stride_enc + c, mask=c < d_load, other=0.0).to(tl.float32)
                f = _activation(tl.sum(w * x, axis=0), i, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr)
        else:
            w = tl.load(enc_ptr + i * stride_enc + c, mask=c < d_load, other=0.0).to(tl.float32)
            f = _activation(tl.sum(w * x, axis=0), i, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr)
        return f

    @triton.jit
    def _sparse_steer_kernel(
        hidden_ptr, residual_ptr, out_ptr, positions_ptr, tokens_ptr, slot_edits_ptr,
        edit_feature_ptr, edit_mul_ptr, edit_add_ptr, gate_feature_ptr, gate_above_ptr, vector_ptr,
        enc_ptr, dec_ptr, gate_bias_ptr, threshold_ptr, mag_scale_ptr, mag_bias_ptr,
        acts_ptr, topk_saes_ptr, topk_lo, topk_hi, null_feature, d,
        stride_h, stride_r, stride_o, stride_tok, stride_es, stride_ee, stride_v, stride_enc, stride_dec, stride_a,
        BLOCK_D: tl.constexpr, N_TOPK: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)  # int64: t * stride overflows int32 on long batches
        c = tl.arange(0, BLOCK_D)
        m = c < d
        h = tl.load(hidden_ptr + t * stride_h + c, mask=m)
        slot = tl.load(tokens_ptr + t * stride_tok).to(tl.int64)
        pos = tl.load(positions_ptr + t)
        n_edits = tl.load(slot_edits_ptr + slot)
        steered = ((slot != 0) & (pos >= tl.load(tokens_ptr + t * stride_tok + 1))
                   & (pos < tl.load(tokens_ptr + t * stride_tok + 2)) & (n_edits >= 0))
        if steered:
            x = (h.to(tl.float32)
                 + tl.load(residual_ptr + t * stride_r + c, mask=m, other=0.0).to(tl.float32))
            delta = tl.load(vector_ptr + slot * stride_v + c, mask=m, other=0.0).to(tl.float32)
            for e in range(0, n_edits):
                row = slot * stride_es + e * stride_ee
                i = tl.load(edit_feature_ptr + row)
                g = tl.load(gate_feature_ptr + row)
                f_i = _feature(x, c, tl.where(i != null_feature, d, 0), i, t, enc_ptr, stride_enc, gate_bias_ptr,
                               threshold_ptr, mag_scale_ptr, mag_bias_ptr, acts_ptr, stride_a, topk_saes_ptr, topk_lo,
                               topk_hi, N_TOPK, BLOCK_F)
                f_g = _feature(x, c, tl.where(g != null_feature, d, 0), g, t, enc_ptr, stride_enc, gate_bias_ptr,
                               threshold_ptr, mag_scale_ptr, mag_bias_ptr, acts_ptr, stride_a, topk_saes_ptr, topk_lo,
                               topk_hi, N_TOPK, BLOCK_F)
                change = tl.where(f_g > tl.load(gate_above_ptr + row),
                                  tl.load(edit_mul_ptr + row) * f_i + tl.load(edit_add_ptr + row), 0.0)
                w = tl.load(dec_ptr + i * stride_dec + c, mask=m, other=0.0).to(tl.float32)
                delta += change * w
            tl.store(out_ptr + t * stride_o + c, (h.to(tl.float32) + delta).to(h.dtype), mask=m)
        else:  # unsteered token: a plain copy, bit-exact
            tl.store(out_ptr + t * stride_o + c, h, mask=m)


def sparse_steer_triton(hidden, residual, positions, tokens, slot_edits, edit_feature, edit_mul, edit_add,
                        gate_feature, gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                        topk: TopkActs | None = None) -> torch.Tensor:
    """Launch the kernel: grid = (T,). Same arguments and result as `sparse_steer_reference`."""
    T, d = hidden.shape
    tables = (edit_feature, edit_mul, edit_add, gate_feature, gate_above)
    assert all(tb.shape == edit_feature.shape and tb.stride() == edit_feature.stride() for tb in tables), \
        "the five edit tables share one layout (slices of the table's [L, S, E] tensors are fine)"
    assert hidden.stride(1) == residual.stride(1) == vector.stride(1) == enc.stride(1) == dec.stride(1) == 1, \
        "rows must be contiguous"
    assert tokens.stride(1) == 1 and slot_edits.stride(0) == 1
    out = torch.empty_like(hidden)
    if T == 0:
        return out
    if topk is not None:
        acts, topk_saes, topk_lo = topk
        assert acts.stride(1) == 1 and topk_saes.is_contiguous()
        n_topk, topk_hi, stride_a = topk_saes.shape[0], topk_lo + acts.shape[1], acts.stride(0)
    else:  # any valid pointer: N_TOPK=0 compiles the TopK branch away
        acts, topk_saes, topk_lo, topk_hi, n_topk, stride_a = vector, slot_edits, 0, 0, 0, 0
    block_d = triton.next_power_of_2(d)
    _sparse_steer_kernel[(T,)](
        hidden, residual, out, positions, tokens, slot_edits,
        edit_feature, edit_mul, edit_add, gate_feature, gate_above, vector,
        enc, dec, gate_bias, threshold, mag_scale, mag_bias,
        acts, topk_saes, topk_lo, topk_hi, enc.shape[0] - 1, d,
        hidden.stride(0), residual.stride(0), out.stride(0), tokens.stride(0), edit_feature.stride(0),
        edit_feature.stride(1), vector.stride(0), enc.stride(0), dec.stride(0), stride_a,
        BLOCK_D=block_d, N_TOPK=n_topk, BLOCK_F=256, num_warps=max(1, min(16, block_d // 256)),
    )
    return out


# ---------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------

def sparse_steer(hidden, residual, positions, tokens, slot_edits, edit_feature, edit_mul, edit_add, gate_feature,
                 gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias,
                 topk: TopkActs | None = None) -> torch.Tensor:
    """hidden [T, d] -> hidden with each token's slot steering added: Triton on CUDA, the distinct-features
    path elsewhere.

    positions [T] int64; tokens [>= T, >= 3] int32 (slot, window start, window end) per token;
    slot_edits [S] int32 (live edits per slot, -1: the slot touches nothing here); edit_feature, gate_feature
    [S, E] int64 (pad: null feature F); edit_mul (a - 1), edit_add (b), gate_above (-inf: no gate) [S, E] f32;
    vector [S, d] f32; enc, dec [F+1, d] (fp32, or the serving dtype); gate_bias, threshold, mag_scale,
    mag_bias [F+1] f32.
    """
    fn = sparse_steer_triton if HAS_TRITON and hidden.is_cuda else sparse_steer_distinct
    return fn(hidden, residual, positions, tokens, slot_edits, edit_feature, edit_mul, edit_add, gate_feature,
              gate_above, vector, enc, dec, gate_bias, threshold, mag_scale, mag_bias, topk)
