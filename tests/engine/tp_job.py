"""Tensor parallelism 2 on the CPU engine (two worker processes), driven by test_tensor_parallel.py.
Usage: python tp_job.py SPEC.json OUT.json"""
from __future__ import annotations

import json
import sys


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    spec = json.load(open(spec_path))
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=512, block_size=32, seed=0, enforce_eager=True,
              tensor_parallel_size=2, distributed_executor_backend="mp",
              additional_config={"sae_steer": spec["settings"]})
    params = [SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True,
                             extra_args=None if s is None else {"steering": s}) for s in spec["steerings"]]
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    json.dump([list(o.outputs[0].token_ids) for o in outs], open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
