"""A multiprocess engine run (API process -> EngineCore -> worker, as serving does), driven by
test_multiprocess.py. Usage: python mp_job.py {vanilla|plugin} SPEC.json OUT.json

vanilla: vLLM with no trace of sae-steer: VLLM_PLUGINS="" skips the general plugin, and the
entry-point logits processor (which vLLM loads whatever VLLM_PLUGINS says) is filtered out of
entry-point discovery before the engine processes are forked.
"""
from __future__ import annotations

import json
import sys


def hide_sae_steer_entry_points() -> None:
    import importlib.metadata as md
    entry_points = md.entry_points

    def without_sae_steer(**params):
        found = entry_points(**params)
        if "group" not in params:  # Python 3.11: no-argument calls return a dict of groups; vLLM passes group=
            return found
        return md.EntryPoints([ep for ep in found if not ep.value.startswith("sae_steer")])

    md.entry_points = without_sae_steer


def main(kind: str, spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    if kind == "vanilla":
        hide_sae_steer_entry_points()
    from vllm import LLM, SamplingParams
    options = dict(model=spec["model"], dtype="float32", max_model_len=512, seed=0, block_size=32, max_num_seqs=32)
    if kind == "plugin":
        options["additional_config"] = {"sae_steer": spec["settings"]}
    llm = LLM(**options)
    requests = spec["requests"] if kind == "plugin" else [r for r in spec["requests"] if r["steering"] is None]
    params = [SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=5, ignore_eos=True,
                             extra_args=None if r["steering"] is None else {"steering": r["steering"]})
              for r in requests]
    outs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in requests], params, use_tqdm=False)
    from vllm.config import VllmConfig
    plugin_loaded = getattr(VllmConfig.compute_hash, "_sae_steer_wrapped", False)
    result = {"plugin_loaded_in_api_process": plugin_loaded, "outputs": [
        {"name": r["name"], "token_ids": list(o.outputs[0].token_ids),
         "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
        for r, o in zip(requests, outs)]}
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
