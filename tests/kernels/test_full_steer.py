"""The full-width encode (Triton, activation fused, for a device list of tokens) == its torch reference, and
TopK steering (the sparse kernel reading a full encode, membership from each token's k-th value) == the
reference: every architecture, listed tokens only, `when` gates on TopK features, the serving dtype."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import ARCHS, DEVICE, MARGIN, TOLERANCES, TOPK_K, decisive_tokens, dictionary, random_case
from sae_steer.kernels.full_steer import encode_reference, encode_rows_torch, encode_triton
from sae_steer.kernels.sparse_steer import activation, sparse_steer_reference, sparse_steer_triton

# Weights in a serving dtype on tensor cores: bf16 on a GPU; fp16 in Triton's interpreter, whose tl.dot on bf16
# operands returns garbage (numpy has no bf16), while fp16 is native there.
SERVING = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16

# The encode is an fp32 matmul (ieee precision) in a different order: ~1e-6 relative on values of ~10.
ENCODE_TOL = dict(rtol=1e-5, atol=1e-5)


def segment(dic, saes, arch):
    """The packed feature range [lo, hi) of one SAE."""
    return dic.offset[arch], dic.offset[arch] + saes[arch].d_sae


def exact_acts(case, lo, hi, x=None, enc=None):
    """float64 activations of the segment and the float64 pre-activation distance to each threshold (of the
    case's stream and packed weights, or of the given ones)."""
    D = case.dic
    x = case.hidden.double() + case.residual.double() if x is None else x.double()
    dot = x @ (D.enc if enc is None else enc).double()[lo:hi].T
    params = (D.gate_bias, D.threshold, D.mag_scale, D.mag_bias)
    gate_bias, threshold, mag_scale, mag_bias = (p.double() for p in params)
    gap = (dot + gate_bias[lo:hi] - threshold[lo:hi]).abs()
    return activation(dot, torch.arange(lo, hi), gate_bias, threshold, mag_scale, mag_bias), gap


def params_of(dic, device=DEVICE):
    return tuple(p.to(device) for p in (dic.enc, dic.gate_bias, dic.threshold, dic.mag_scale, dic.mag_bias))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d,T", [(37, 1), (129, 70)])
def test_encode_matches_reference(arch, d, T):
    dic, saes = dictionary(d, seed=d)
    case = random_case(dic, T, 0, seed=T)
    lo, hi = segment(dic, saes, arch)
    got = encode_triton(case.hidden.to(DEVICE), case.residual.to(DEVICE), *params_of(dic), lo, hi)
    want = encode_reference(case.hidden, case.residual, *params_of(dic, "cpu"), lo, hi)
    _, gap = exact_acts(case, lo, hi)
    ok = gap > MARGIN  # elementwise: away from a JumpReLU/gated jump
    assert ok.float().mean() > 0.95
    torch.testing.assert_close(got.cpu()[ok], want[ok], **ENCODE_TOL)


def test_encode_writes_the_listed_tokens_only_and_nothing_when_the_count_is_zero():
    """The table passes a device list and count (its per-step buffer): only those rows are written; count 0 is
    a launch that does nothing (a replayed graph flips it in place)."""
    dic, saes = dictionary(64, seed=3)
    case = random_case(dic, 9, 0, seed=4)
    lo, hi = segment(dic, saes, "topk")
    hidden, residual = case.hidden.to(DEVICE), case.residual.to(DEVICE)
    column = torch.zeros(9, 4, dtype=torch.int32, device=DEVICE)  # a strided column, as the table's
    rows, count = column[:, 2], torch.zeros((), dtype=torch.int32, device=DEVICE)
    rows[:3] = torch.tensor([7, 2, 5], dtype=torch.int32)
    untouched = encode_triton(hidden, residual, *params_of(dic), lo, hi, rows, count).cpu()
    marker = encode_triton(hidden, residual, *params_of(dic), lo, hi, rows, count)  # rows are as empty() leaves them
    count.fill_(3)
    acts = encode_triton(hidden, residual, *params_of(dic), lo, hi, rows, count).cpu()
    full = encode_reference(case.hidden, case.residual, *params_of(dic, "cpu"), lo, hi)
    torch.testing.assert_close(acts[[7, 2, 5]], full[[7, 2, 5]], **ENCODE_TOL)
    assert untouched.shape == marker.shape == (9, hi - lo)
    torch_rows = encode_rows_torch(case.hidden, case.residual, rows.cpu(), count.cpu(), *params_of(dic, "cpu"), lo, hi)
    torch.testing.assert_close(torch_rows[[7, 2, 5]], full[[7, 2, 5]], **ENCODE_TOL)
    assert not torch_rows[[0, 1, 3, 4, 6, 8]].any(), "unlisted tokens are not encoded"


def topk_args(dic, saes, acts, device):
    lo, hi = segment(dic, saes, "topk")
    return acts, torch.tensor([[lo, hi, TOPK_K]], dtype=torch.int32, device=device), lo


def membership_decided(exact):
    """bool [T]: tokens whose k-th and (k+1)-th activations are more than MARGIN apart (their live set cannot
    depend on fp32 noise)."""
    top = exact.topk(TOPK_K + 1, dim=1).values
    return (top[:, TOPK_K - 1] - top[:, TOPK_K]) > MARGIN


@pytest.mark.parametrize("d,T,E,dtype,weights", [(37, 1, 4, torch.float32, torch.float32),
                                                 (129, 60, 16, torch.float32, torch.float32),
                                                 (37, 40, 9, torch.bfloat16, torch.float32),
                                                 (129, 40, 6, torch.bfloat16, SERVING)])
def test_topk_steering_matches_reference(d, T, E, dtype, weights):
    dic, saes = dictionary(d, seed=d)
    lo, hi = segment(dic, saes, "topk")
    case = random_case(dic, T, E, dtype, seed=E, features=(lo, hi))  # edits and `when` on the TopK SAE
    args = list(case.args())
    args[11], args[12] = args[11].to(weights), args[12].to(weights)  # enc, dec in the table's weight dtype
    enc_params = (args[11], *args[13:])
    acts = encode_triton(args[0], args[1], *enc_params, lo, dic.null)
    got = sparse_steer_triton(*args, topk_args(dic, saes, acts, DEVICE)).cpu()
    cpu = [a.cpu() for a in args]
    x = cpu[0].float() + cpu[1].float()
    if weights != torch.float32:  # the tensor-core product rounds x to the weights' dtype, as the model's own do
        x = x.to(weights).float()
    want_acts = encode_reference(x, torch.zeros_like(x), cpu[11], *cpu[13:], lo, dic.null)
    want = sparse_steer_reference(*cpu, topk_args(dic, saes, want_acts, "cpu"))
    exact, _ = exact_acts(case, lo, hi, x, cpu[11])
    exact_topk = (torch.cat([exact, torch.zeros(T, dic.null - hi, dtype=exact.dtype)], 1),
                  torch.tensor([[lo, hi, TOPK_K]]), lo)
    ok = decisive_tokens(case, exact_topk) & membership_decided(exact)
    assert ok.float().mean() > 0.7
    torch.testing.assert_close(got[ok], want[ok], **TOLERANCES[dtype])
    if T >= 40:
        assert (want != case.hidden).any(1).float().mean() > 0.15, "TopK steering should change tokens"


def test_topk_members_are_the_k_largest_and_ties_are_kept():
    """Membership from the k-th value: exactly the k largest when they are distinct; every feature tied with
    the k-th when there are ties (the documented rule), in the kernel and the reference alike."""
    dic, saes = dictionary(37, seed=2)
    lo, hi = segment(dic, saes, "topk")
    n = hi - lo
    case = random_case(dic, 4, 1, seed=9, features=(lo, hi))
    acts = torch.zeros(4, dic.null - lo)
    acts[:, :n] = torch.rand(4, n) + 1
    acts[1, :TOPK_K + 2] = 5.0  # token 1: k + 2 features tied at the top
    # every token's single edit: ablate (a - 1 = -1) feature lo + j
    checked = 0
    for j in range(20):
        case.edit_feature[:] = lo + j
        case.edit_mul[:], case.edit_add[:] = -1.0, 0.0
        case.slot_edits[1:-1] = 1
        case.tokens[:, 0] = 1
        case.tokens[:, 1], case.tokens[:, 2] = 0, 2 ** 31 - 1
        case.vector[:] = 0
        args = case.args("cpu")
        ref = sparse_steer_reference(*args, topk_args(dic, saes, acts, "cpu"))
        got = sparse_steer_triton(*case.args(), topk_args(dic, saes, acts.to(DEVICE), DEVICE)).cpu()
        torch.testing.assert_close(got, ref, **TOLERANCES[torch.float32])
        for t in range(4):
            kth = acts[t, :n].topk(TOPK_K).values[-1]
            member = bool(acts[t, j] >= kth)
            checked += member
            assert (not torch.equal(ref[t], case.hidden[t])) == member or acts[t, j] == 0, (t, j)
    assert checked >= TOPK_K + 2
