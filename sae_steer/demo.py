"""`sae-steer demo`: a steered completion beside the unsteered one, on a model built here.

No model hub is reachable, so the demo builds a tiny random Llama (seconds), then makes the
steering visible by construction: a CAA-style vector and one SAE feature whose decoder row is
the unembedding direction of a chosen word. Pushing the residual stream along it makes the
model say that word, which a random model would otherwise almost never do.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

LAYER = 2
PROMPTS = ["The licensee shall", "Permission is hereby granted", "You may not"]


def _word_direction(model_dir: Path, word: str) -> tuple[int, torch.Tensor]:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(model_dir)(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SystemExit(f"--word {word!r} is {len(ids)} tokens for the demo tokenizer; pick a one-token word "
                         f"such as ' software', ' license', ' copy'")
    token = ids[0]
    unembed = load_file(str(model_dir / "model.safetensors"))["lm_head.weight"]  # [vocab, d]
    v = unembed[token]
    return token, v / v.norm()


def build_demo_artifacts(workdir: Path, word: str) -> tuple[Path, dict]:
    from sae_steer.formats import save_sae, save_vector
    from sae_steer.tiny_model import build_tiny_llama, random_sae
    print(f"[demo] 1/3 tiny Llama in {workdir}", flush=True)
    model = build_tiny_llama(workdir / "tiny-llama")
    token, direction = _word_direction(model, word)
    print(f"[demo] 2/3 SAE at layer {LAYER} whose feature 0 writes the direction of {word!r} (token {token})",
          flush=True)
    sae = random_sae(direction.shape[0], 512, LAYER, "relu", seed=1)
    sae.W_dec[0] = direction
    sae_path = save_sae(sae, workdir / "saes" / "demo-sae")
    print(f"[demo] 3/3 steering vector toward {word!r}", flush=True)
    vec_path = save_vector({LAYER: direction}, workdir / "vectors" / f"toward-{word.strip()}.safetensors")
    settings = {"saes": {"demo-sae": str(sae_path)}, "vectors": {"toward-word": str(vec_path)}}
    return model, settings


def run_demo(workdir: str = "demo-artifacts", word: str = " software", enforce_eager: bool = False) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model, settings = build_demo_artifacts(Path(workdir).resolve(), word)
    from vllm import LLM, SamplingParams
    print("[demo] starting vLLM with the sae-steer plugin (compiled mode: ~30-60 s the first time)", flush=True)
    llm = LLM(model=str(model), dtype="float32", max_model_len=512, block_size=32, seed=0, enforce_eager=enforce_eager,
              additional_config={"sae_steer": settings})
    configs = {
        "unsteered": None,
        # The residual stream's norm is ~190 at this layer, so the nudge has to be of that order.
        "CAA vector, coef 40": {"interventions": [{"type": "vector", "vector": "toward-word", "coef": 40.0}]},
        "CAA vector, coef 100": {"interventions": [{"type": "vector", "vector": "toward-word", "coef": 100.0}]},
        "SAE feature 0 clamped to 100, generated tokens only": {"interventions": [
            {"type": "sae", "sae": "demo-sae", "feature": 0, "mode": "clamp", "value": 100.0}],
            "positions": "generated"},
    }
    # Every prompt x every config in ONE batch: each request carries its own steering.
    jobs = [(p, name, s) for p in PROMPTS for name, s in configs.items()]
    params = [SamplingParams(max_tokens=24, temperature=0.0,
                             extra_args=None if s is None else {"steering": s}) for _, _, s in jobs]
    outputs = llm.generate([p for p, _, _ in jobs], params, use_tqdm=False)
    width = max(len(n) for n in configs)
    print(f"\nSteering toward {word!r}: {len(jobs)} requests with their own steering in one batch.\n"
          f"(The model is random, so its unsteered text is gibberish; watch {word!r} appear.)\n")
    for i, (p, name, _) in enumerate(jobs):
        if name == "unsteered":
            print(f"prompt: {p!r}")
        text = outputs[i].outputs[0].text.replace("\n", " ")
        print(f"  {name:<{width}} | {text!r}"[:180])
        if i % len(configs) == len(configs) - 1:
            print()
    llm.llm_engine.engine_core.shutdown()
