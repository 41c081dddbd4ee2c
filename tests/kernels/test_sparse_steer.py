"""The sparse steering kernel == its torch reference, over odd widths, 1..200 tokens, 0..64 live edits per slot
(real features past the count, which must not be read), idle slots, positions windows, `when` gates, all
four packed architectures and fp32/bf16/fp16 hidden states."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, TOLERANCES, decisive_tokens, dictionary, random_case
from sae_steer.kernels.sparse_steer import sparse_steer, sparse_steer_distinct, sparse_steer_reference, sparse_steer_triton

CASES = [  # (d, T, E, dtype)
    (37, 1, 1, torch.float32),  # a single decode token
    (37, 200, 8, torch.float32),  # a prefill chunk
    (129, 40, 64, torch.float32),  # the widest slots, d over several tiles
    (129, 30, 0, torch.float32),  # vectors only
    (37, 50, 3, torch.bfloat16),
    (129, 20, 17, torch.float16),  # E not a power of two
]


@pytest.mark.parametrize("d,T,E,dtype", CASES, ids=[f"d{d}-T{T}-E{E}-{str(dt)[6:]}" for d, T, E, dt in CASES])
def test_kernel_matches_reference(d, T, E, dtype):
    dic, _ = dictionary(d, seed=d)
    case = random_case(dic, T, E, dtype, seed=T + E)
    args = case.args()
    got = sparse_steer_triton(*args).cpu()
    want = sparse_steer_reference(*case.args("cpu"))
    assert got.dtype == dtype and got.shape == (T, d)
    ok = decisive_tokens(case)
    assert ok.float().mean() > 0.9, "too few decisive tokens: the case tests little"
    torch.testing.assert_close(got[ok], want[ok], **TOLERANCES[dtype])
    unsteered = case.token_slot == 0
    assert torch.equal(got[unsteered], case.hidden[unsteered]), "slot 0 must pass hidden through bit-exactly"


def test_steering_changes_something():
    """Guards the comparison above against a kernel and a reference that both do nothing."""
    dic, _ = dictionary(37)
    case = random_case(dic, 30, 4)
    got = sparse_steer_triton(*case.args()).cpu()
    slot = case.token_slot
    steered = (slot != 0) & ((case.slot_edits[slot] > 0) | case.vector[slot].any(1))
    assert steered.sum() >= 10
    assert (got[steered] - case.hidden[steered]).abs().amax(1).min() > 1e-3


def test_kernel_reads_the_table_layout_in_place():
    """Row strides of hidden/residual (views of larger buffers) and non-contiguous edit tables."""
    dic, _ = dictionary(37)
    case = random_case(dic, 25, 5, seed=3)
    args = list(case.args())
    wide = torch.zeros(25, 64, device=DEVICE)
    wide[:, 5:42] = args[0]
    args[0] = wide[:, 5:42]  # stride(0) = 64
    for i in range(5, 10):  # the edit tables as the table passes them: [:, :E] views of max_edits-wide tables
        wide_table = torch.zeros(args[i].shape[0], args[i].shape[1] + 3, dtype=args[i].dtype, device=DEVICE)
        wide_table[:, : args[i].shape[1]] = args[i]
        args[i] = wide_table[:, : args[i].shape[1]]
    assert not args[5].is_contiguous()
    torch.testing.assert_close(sparse_steer_triton(*args).cpu(), sparse_steer_reference(*case.args("cpu")),
                               **TOLERANCES[torch.float32])


@pytest.mark.parametrize("d,T,E,dtype", CASES, ids=[f"d{d}-T{T}-E{E}-{str(dt)[6:]}" for d, T, E, dt in CASES])
def test_distinct_features_path_matches_reference(d, T, E, dtype):
    """The CPU fast path (one matmul over the distinct features) == the per-token reference."""
    dic, _ = dictionary(d, seed=d)
    case = random_case(dic, T, E, dtype, seed=T + E)
    got, want = sparse_steer_distinct(*case.args("cpu")), sparse_steer_reference(*case.args("cpu"))
    ok = decisive_tokens(case)
    torch.testing.assert_close(got[ok], want[ok], **TOLERANCES[dtype])
    unsteered = case.token_slot == 0
    assert torch.equal(got[unsteered], case.hidden[unsteered])


def test_dispatcher_off_cuda_uses_distinct_features():
    dic, _ = dictionary(37)
    case = random_case(dic, 10, 4, seed=1)
    assert torch.equal(sparse_steer(*case.args("cpu")), sparse_steer_distinct(*case.args("cpu")))


def test_bf16_weights_match_the_reference_on_the_same_weights():
    """Weights held in the serving dtype: the kernel reads them as they are and accumulates in fp32."""
    dic, _ = dictionary(129, seed=4)
    case = random_case(dic, 30, 6, torch.bfloat16, seed=5)
    args = list(case.args())
    args[11], args[12] = args[11].to(torch.bfloat16), args[12].to(torch.bfloat16)  # enc, dec
    got = sparse_steer_triton(*args).cpu()
    want = sparse_steer_reference(*(a.cpu() for a in args))
    ok = decisive_tokens(case)
    torch.testing.assert_close(got[ok], want[ok], **TOLERANCES[torch.bfloat16])
