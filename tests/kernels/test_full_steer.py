"""The full-width path (Triton encode + fused activation, top-k, sparse epilogue) == its torch reference:
the encode of every architecture, TopK steering with `when` gates, and telemetry."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import ARCHS, DEVICE, MARGIN, TOLERANCES, TOPK_K, decisive_tokens, dictionary, random_case
from sae_steer.kernels.full_steer import encode_reference, encode_triton, full_steer_reference, full_steer_triton
from sae_steer.kernels.sparse_steer import activation

# The encode is an fp32 matmul (ieee precision) in a different order: ~1e-6 relative on values of ~10.
ENCODE_TOL = dict(rtol=1e-5, atol=1e-5)


def segment(dic, saes, arch):
    """The packed feature range [lo, hi) of one SAE."""
    return dic.offset[arch], dic.offset[arch] + saes[arch].d_sae


def exact_acts(case, lo, hi):
    """float64 activations of the segment and the float64 pre-activation distance to each threshold."""
    D = case.dic
    x = case.hidden.double() + case.residual.double()
    dot = x @ D.enc.double()[lo:hi].T
    params = (D.gate_bias, D.threshold, D.mag_scale, D.mag_bias)
    gate_bias, threshold, mag_scale, mag_bias = (p.double() for p in params)
    gap = (dot + gate_bias[lo:hi] - threshold[lo:hi]).abs()
    return activation(dot, torch.arange(lo, hi), gate_bias, threshold, mag_scale, mag_bias), gap


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d,T", [(37, 1), (129, 70)])
def test_encode_matches_reference(arch, d, T):
    dic, saes = dictionary(d, seed=d)
    case = random_case(dic, T, 0, seed=T)
    lo, hi = segment(dic, saes, arch)
    params = (dic.enc, dic.gate_bias, dic.threshold, dic.mag_scale, dic.mag_bias)
    got = encode_triton(case.hidden.to(DEVICE), case.residual.to(DEVICE), *(p.to(DEVICE) for p in params), lo, hi)
    want = encode_reference(case.hidden, case.residual, *params, lo, hi)
    _, gap = exact_acts(case, lo, hi)
    ok = gap > MARGIN  # elementwise: away from a JumpReLU/gated jump
    assert ok.float().mean() > 0.95
    torch.testing.assert_close(got.cpu()[ok], want[ok], **ENCODE_TOL)


def exact_topk(case, lo, hi, k):
    """-> the TopK segment in float64, and bool [T]: tokens whose k-th and (k+1)-th activations are more
    than MARGIN apart (their live set cannot depend on fp32 noise)."""
    acts, _ = exact_acts(case, lo, hi)
    top = acts.topk(k + 1, dim=1)
    return (lo, hi, top.indices[:, :k], top.values[:, :k]), (top.values[:, k - 1] - top.values[:, k]) > MARGIN


@pytest.mark.parametrize("d,T,E,top_k,dtype", [(37, 1, 4, 8, torch.float32), (129, 60, 16, 3, torch.float32),
                                                (37, 40, 9, 6, torch.bfloat16)])
def test_topk_steering_and_telemetry_match_reference(d, T, E, top_k, dtype):
    dic, saes = dictionary(d, seed=d)
    lo, hi = segment(dic, saes, "topk")
    case = random_case(dic, T, E, dtype, seed=E, features=(lo, hi))  # edits and `when` on the TopK SAE
    got, idx, val = full_steer_triton(*case.args(), lo=lo, hi=hi, k=TOPK_K, top_k=top_k)
    want, want_idx, want_val = full_steer_reference(*case.args("cpu"), lo=lo, hi=hi, k=TOPK_K, top_k=top_k)
    exact_segment, membership_decided = exact_topk(case, lo, hi, TOPK_K)
    ok = decisive_tokens(case, exact_segment) & membership_decided
    assert ok.float().mean() > 0.8
    torch.testing.assert_close(got.cpu()[ok], want[ok], **TOLERANCES[dtype])
    # telemetry: the same values, and each reported index really has its reported activation
    assert idx.shape == val.shape == (T, top_k)
    torch.testing.assert_close(val.cpu(), want_val, **ENCODE_TOL)
    if top_k > TOPK_K:
        assert (val[:, TOPK_K:] == 0).all(), "a TopK SAE reports at most k active features"
    acts, _ = exact_acts(case, lo, hi)
    live = val.cpu()[:, :TOPK_K] > 0
    torch.testing.assert_close(acts.gather(1, idx.cpu())[:, :TOPK_K][live].float(), val.cpu()[:, :TOPK_K][live],
                               **ENCODE_TOL)


def test_telemetry_of_a_sparse_sae_leaves_steering_sparse():
    """k=None (not TopK): hidden' is exactly the sparse kernel's; telemetry is the top of the full encode."""
    dic, saes = dictionary(37)
    lo, hi = segment(dic, saes, "jumprelu")
    case = random_case(dic, 30, 5, seed=2)
    got, idx, val = full_steer_triton(*case.args(), lo=lo, hi=hi, top_k=5)
    want, want_idx, want_val = full_steer_reference(*case.args("cpu"), lo=lo, hi=hi, top_k=5)
    ok = decisive_tokens(case)
    torch.testing.assert_close(got.cpu()[ok], want[ok], **TOLERANCES[torch.float32])
    torch.testing.assert_close(val.cpu(), want_val, **ENCODE_TOL)
    assert idx.shape == (30, 5) and int(idx.max()) < hi - lo


def test_encode_skips_its_work_when_the_live_flag_is_zero():
    """The graph-safe table passes a device flag: 0 (no request steers a TopK SAE of the layer) -> no work and
    zeros; 1 -> the same activations as without a flag. A replayed graph flips it in place."""
    dic, saes = dictionary(64, seed=3)
    case = random_case(dic, 9, 0, seed=4)
    lo, hi = segment(dic, saes, "topk")
    params = [p.to(DEVICE) for p in (dic.enc, dic.gate_bias, dic.threshold, dic.mag_scale, dic.mag_bias)]
    hidden, residual = case.hidden.to(DEVICE), case.residual.to(DEVICE)
    live = torch.zeros((), dtype=torch.int32, device=DEVICE)
    assert torch.equal(encode_triton(hidden, residual, *params, lo, hi, live=live).cpu(), torch.zeros(9, hi - lo))
    live.fill_(1)
    want = encode_triton(hidden, residual, *params, lo, hi)
    assert want.abs().sum() > 0
    assert torch.equal(encode_triton(hidden, residual, *params, lo, hi, live=live), want)
