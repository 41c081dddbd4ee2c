"""`sae-steer demo`: serves steered completions beside the unsteered ones, on a model built here.

It starts `sae-steer serve` (vLLM's OpenAI server with the plugin) and sends concurrent requests
with different `steering`, each with `compare: true`, so each answer comes back beside the
unsteered completion of the same prompt.

No model hub is reachable, so the demo builds a tiny random Llama (seconds), then makes the
steering visible by construction: a CAA-style vector and one SAE feature whose decoder row is
the unembedding direction of a chosen word. Pushing the residual stream along it makes the
model say that word, which a random model would otherwise almost never do.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: Path, settings: dict, workdir: Path, enforce_eager: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [sys.executable, "-m", "sae_steer.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "512", "--block-size", "32", "--served-model-name", "tiny"]
    for name, path in settings["saes"].items():
        argv += ["--sae", f"{name}={path}"]
    for name, path in settings["vectors"].items():
        argv += ["--vector", f"{name}={path}"]
    if enforce_eager:
        argv.append("--enforce-eager")
    log = workdir / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    server = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    print(f"[demo] starting `sae-steer serve` on {url} (log: {log}; compiled mode takes ~1 min the first time)",
          end="", flush=True)
    started = time.time()
    while time.time() - started < 600:
        if server.poll() is not None:
            raise SystemExit(f"\n[demo] the server exited ({server.returncode}); see {log}:\n"
                             + log.read_text()[-3000:])
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                print(f" up after {time.time() - started:.0f} s", flush=True)
                return server, url
        except requests.ConnectionError:
            pass
        print(".", end="", flush=True)
        time.sleep(2)
    server.terminate()
    raise SystemExit(f"[demo] the server did not come up in 10 minutes; see {log}")


def run_demo(workdir: str = "demo-artifacts", word: str = " software", enforce_eager: bool = False) -> None:
    work = Path(workdir).resolve()
    model, settings = build_demo_artifacts(work, word)
    server, url = _start_server(model, settings, work, enforce_eager)
    try:
        steerings = {
            # The residual stream's norm is ~190 at this layer, so the nudge has to be of that order.
            "CAA vector, coef 40": {"interventions": [{"type": "vector", "vector": "toward-word", "coef": 40.0}]},
            "CAA vector, coef 100": {"interventions": [{"type": "vector", "vector": "toward-word", "coef": 100.0}]},
            "SAE feature 0 clamped to 100 (generated tokens only)": {"interventions": [
                {"type": "sae", "sae": "demo-sae", "feature": 0, "mode": "clamp", "value": 100.0}],
                "positions": "generated"},
        }
        jobs = [(p, name, s) for p in PROMPTS for name, s in steerings.items()]

        def ask(job):
            prompt, _, steering = job
            r = requests.post(url + "/v1/completions", timeout=300, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0.0,
                "steering": steering, "compare": True})
            r.raise_for_status()
            body = r.json()
            return body["unsteered"]["choices"][0]["text"], body["choices"][0]["text"]

        # All requests at once: the server batches them, each with its own steering.
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        width = max(len(n) for n in steerings)
        print(f"\nSteering toward {word!r}: {len(jobs)} concurrent requests to {url}/v1/completions, each with its "
              f"own `steering` and `compare: true`.\n(The model is random, so its unsteered text is gibberish; "
              f"watch {word!r} appear.)\n")
        for i, (prompt, name, _) in enumerate(jobs):
            unsteered, steered = answers[i]
            if i % len(steerings) == 0:
                print(f"prompt: {prompt!r}")
                print(f"  {'unsteered':<{width}} | {unsteered!r}"[:180])
            print(f"  {name:<{width}} | {steered!r}"[:180])
            if i % len(steerings) == len(steerings) - 1:
                print()
    finally:
        server.terminate()
        server.wait(60)
