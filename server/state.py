"""SteeringState: what the routes share, built once per API server (facts of the served model and
its SAEs, built vectors, the logit lens, SAEs and tokenizer loaded on first use)."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

import torch
from fastapi import Request

from sae_steer.capture import capture_request, read_capture
from sae_steer.features import load_labels
from sae_steer.server.auth import admin_key
from sae_steer.server.store import VectorStore
from sae_steer.spec import Admitted, SteeringError, VectorIntervention, parse_steering
from sae_steer.vllm_plugin import facts, observers
from sae_steer.vllm_plugin.logit_bias import LogitHead, head_of_checkpoint

logger = logging.getLogger("vllm.sae_steer")
VECTOR_DIR_ENV = "SAE_STEER_VECTOR_DIR"
STORE_POLL_ENV = "SAE_STEER_STORE_POLL"  # seconds between rescans of the vector directory (--steering-store-poll)
CAPTURE_CONCURRENCY = 16  # engine requests in flight for CAA builds, all builds together


class SteeringState:
    """What the routes need, built once per API server."""

    def __init__(self, engine_client, args):
        self.engine_client = engine_client
        self.facts = facts.current()
        if self.facts is None:
            raise RuntimeError("sae-steer's HTTP endpoints are enabled but the engine has no sae_steer settings: "
                               "pass --additional-config '{\"sae_steer\": {...}}' (or use `sae-steer serve`)")
        self.settings = facts.current_settings()
        self.model_path = Path(args.model)
        self.tokenizer_path = getattr(args, "tokenizer", None) or args.model
        self.admin_key = admin_key(args)
        # Telemetry and capture pass through this directory: refuse to start if it is not private.
        self.runtime_dir = observers.check_runtime_dir()
        self.max_model_len = int(getattr(getattr(engine_client, "model_config", None), "max_model_len", 0) or 0)
        self.capture_slots = asyncio.Semaphore(CAPTURE_CONCURRENCY)
        self._load_lock = threading.Lock()  # the logit lens, SAEs and tokenizer load once, in a worker thread
        # Vectors built over HTTP are written here; with `roots` set, it must lie under one of them.
        self.vector_dir = self.settings.check_path(os.environ.get(VECTOR_DIR_ENV) or "steering-vectors",
                                                   "vector dir (--steering-vector-dir)")
        # Vectors built over HTTP (here or on a replica sharing the directory) and their calibrations; the
        # store keeps these maps current (store.py), endpoints.py starts its rescans.
        self.store = VectorStore(self.vector_dir, self._unservable)
        self.store.apply(self.store.scan())
        self.built, self.built_calibrations = self.store.vectors, self.store.calibrations
        self._head: LogitHead | str | None = None  # a string: why the model has none
        self._tokenizer = None
        self._saes: dict[str, object] = {}  # SAE name -> SparseAutoencoder, loaded on first use
        self.logit_lens = functools.lru_cache(maxsize=4096)(self._logit_lens)
        self._records: dict[str, object] = {}  # SAE name -> FeatureRecords or None
        self.labels = {name: load_labels(path, self.facts.saes[name].d_sae) for name, path in self.settings.labels.items()}

    def _unservable(self, name: str, layers: dict[int, torch.Tensor]) -> str | None:
        """Why a stored vector cannot be served by this server, or None."""
        if name in self.facts.vectors:
            return f"{name!r} is a vector of the server's config"
        if not layers:
            return "it has no layers"
        if not set(layers) <= self.facts.steerable_layers:
            return (f"layers {sorted(set(layers) - self.facts.steerable_layers)} are not steerable on this server "
                    f"(--steering-layers: {sorted(self.facts.steerable_layers)})")
        if any(v.shape != (self.facts.d_model,) for v in layers.values()):
            return f"its vectors are not of the served model's d_model ({self.facts.d_model})"
        return None

    # ---- steering with built vectors: expanded to inline vectors, so workers need no new files ----

    def check_steering(self, raw) -> Admitted:
        """Validate against the served model and the built vectors (so errors name the user's own fields);
        each built vector becomes inline vectors, one per layer. The result is what vLLM's admission takes
        without parsing it again."""
        built = {name: frozenset(layers) for name, layers in self.built.items()}
        steering = parse_steering(raw, replace(self.facts, vectors={**self.facts.vectors, **built},
                                               calibrations={**self.facts.calibrations, **self.built_calibrations}))
        if not any(getattr(iv, "vector", None) in self.built for iv in steering.interventions):
            return Admitted(steering, self.facts)
        interventions, limit = [], self.facts.max_abs_value
        for i, iv in enumerate(steering.interventions):
            if getattr(iv, "vector", None) not in self.built:
                interventions.append(iv)
                continue
            for L, v in sorted(self.built[iv.vector].items()):
                if iv.layer not in (None, L):
                    continue
                if not (torch.isfinite(v).all() and v.abs().max() <= limit):  # as inline values are checked
                    raise SteeringError(f"steering.interventions[{i}].vector", f"built vector {iv.vector!r} has "
                                        f"values at layer {L} that are not finite or exceed {limit:g}")
                interventions.append(VectorIntervention(type="vector", layer=L, values=v.tolist(), coef=iv.coef))
        return Admitted(steering.model_copy(update={"interventions": interventions}), self.facts)

    # ---- captures through the engine (CAA builds, the capture route) ----

    async def capture(self, token_ids: list[int], layers: list[int], text: str,
                      positions: str = "all", steering: Admitted | None = None) -> dict[int, torch.Tensor]:
        """One capture request (sae_steer.capture), at most CAPTURE_CONCURRENCY in flight across all builds;
        its files are read and discarded off the event loop, whatever happens. CaptureMissing names `text`.
        With `steering` (checked by check_steering), the stream is read under those interventions (the lens
        route's steered grid)."""
        cid, prompt, params = capture_request(token_ids, layers, positions)
        if steering is not None:
            params.extra_args["steering"] = steering
        async with self.capture_slots:
            try:
                async for _ in self.engine_client.generate(prompt, params, f"sae-steer-capture-{cid}"):
                    pass
                return await asyncio.to_thread(read_capture, cid, layers, text, len(token_ids), positions)
            finally:
                await asyncio.to_thread(observers.discard, cid)

    # ---- model pieces for the logit lens, loaded on first use in this process ----

    # Blocking (disk, CPU): call them through asyncio.to_thread from the routes, never on the event loop.

    def tokenizer(self):
        with self._load_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            return self._tokenizer

    def feature_records(self, name: str):
        """The SAE's feature records (top contexts, logit lens, label: `sae-steer fit-sae` writes them beside
        the SAE: features.jsonl in an SAE folder, <name>.features.jsonl beside a one-file SAE), or None when
        it has none. Loaded once, on first use."""
        with self._load_lock:
            if name not in self._records:
                from sae_steer.feature_records import RECORDS_FILE, FeatureRecords
                sae = Path(self.settings.saes[name])
                path = sae / RECORDS_FILE if sae.is_dir() else sae.with_name(f"{sae.stem}.{RECORDS_FILE}")
                self._records[name] = FeatureRecords.load(path) if path.is_file() else None
            return self._records[name]

    def sae(self, name: str):
        """A registered SAE (its decoder: the feature route), loaded on first use."""
        with self._load_lock:
            if name not in self._saes:
                from sae_steer.formats import load_sae
                self._saes[name] = load_sae(self.settings.saes[name], self.settings.layer_of.get(name))
            return self._saes[name]

    def logit_head(self) -> LogitHead:
        """The served model's final norm (gain, LayerNorm's bias, epsilon) and unembedding, read from its
        safetensors by its family's names and from its config on first use; LogitLensUnavailable, saying what
        is missing, where they cannot be read."""
        with self._load_lock:
            if self._head is None:
                try:
                    self._head = head_of_checkpoint(self.model_path)
                except (OSError, ValueError, RuntimeError) as e:  # kept: the files will not change
                    self._head = f"the logit lens of {self.model_path} is unavailable: {e}"
            if isinstance(self._head, str):
                raise LogitLensUnavailable(self._head)
            return self._head

    def _logit_lens(self, name: str, index: int, k: int) -> dict[str, list[tuple[int, float]]]:
        """Feature `index` of SAE `name`: its logit lens l = W_U (g * W_dec[index]) (LogitHead.logit_lens, the
        direction logit steering normalizes), {"top": [(token_id, l[token_id])] * k, "bottom": the k lowest}.
        Cached per (name, index, k) as self.logit_lens."""
        lens = self.logit_head().logit_lens(self.sae(name).W_dec[index][None])[0]
        k = min(k, lens.shape[0])
        top, bottom = lens.topk(k), lens.topk(k, largest=False)
        return {"top": list(zip(top.indices.tolist(), top.values.tolist())),
                "bottom": list(zip(bottom.indices.tolist(), bottom.values.tolist()))}


def store_poll_seconds() -> float:
    """$SAE_STEER_STORE_POLL: seconds between rescans of the vector store (default 2; 0: at startup only)."""
    text = os.environ.get(STORE_POLL_ENV) or "2"
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"--steering-store-poll ({STORE_POLL_ENV}): expected seconds >= 0, got {text!r}")
    return seconds


class LogitLensUnavailable(Exception):
    """The served model's final norm or unembedding cannot be read (the feature route answers why)."""


def state(request: Request) -> SteeringState:
    return request.app.state.sae_steer
