"""On a GPU: the kernels can be captured in a CUDA graph and replayed on new contents of the same buffers,
as vLLM replays its captured decode steps (the table is updated in place between steps): the sparse kernel,
and the TopK path (the encode of a device token list, then the sparse kernel reading its activations)."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, TOPK_K, dictionary, random_case
from sae_steer.kernels.full_steer import encode_triton
from sae_steer.kernels.sparse_steer import sparse_steer_triton

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (TRITON_INTERPRET runs on CPU)")


@pytest.mark.parametrize("path", ["sparse", "topk"])
def test_replay_reads_the_new_contents_of_the_captured_buffers(path):
    dic, _ = dictionary(129, seed=1)
    lo, hi = dic.offset["topk"], dic.offset["topk"] + 40
    first, second = random_case(dic, 64, 8, seed=1), random_case(dic, 64, 8, seed=2)
    buffers = [t.clone() for t in first.args()]
    listed = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    count = torch.zeros((), dtype=torch.int32, device=DEVICE)
    saes = torch.tensor([[lo, hi, TOPK_K]], dtype=torch.int32, device=DEVICE)
    if path == "sparse":
        run = sparse_steer_triton
    else:
        def run(*args):
            acts = encode_triton(args[0], args[1], args[11], *args[13:], lo, dic.null, listed, count)
            return sparse_steer_triton(*args, (acts, saes, lo))

    stream = torch.cuda.Stream()  # warm up (compile) outside the capture, as torch.cuda.graphs asks
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(*buffers)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captured with an empty token list: the encode does nothing
        out = run(*buffers)
    for buf, new in zip(buffers, second.args()):  # the next step: same addresses, new contents
        buf.copy_(new)
    listed.copy_(torch.arange(64, dtype=torch.int32))  # every token encoded (edits may name TopK features)
    count.fill_(64)
    graph.replay()
    # the kernels are deterministic: a replay equals an eager run on the same inputs, bit for bit
    assert torch.equal(out, run(*second.args()))
    assert not torch.equal(out, run(*first.args())), "the replay must not return the captured step's result"
