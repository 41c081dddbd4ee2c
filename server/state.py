"""SteeringState: what the routes share, built once per API server (facts of the served model and
its SAEs, built vectors, the logit lens and tokenizer loaded on first use)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

import torch
from fastapi import Request

from sae_steer.features import LogitLens, load_labels
from sae_steer.server.auth import admin_key
from sae_steer.spec import Admitted, SteeringError, VectorIntervention, parse_steering
from sae_steer.vllm_plugin import facts, observers

logger = logging.getLogger("vllm.sae_steer")
VECTOR_DIR_ENV = "SAE_STEER_VECTOR_DIR"
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
        self._load_lock = threading.Lock()  # the logit lens and tokenizer load once, in a worker thread
        # Vectors built over HTTP are written here; with `roots` set, it must lie under one of them.
        self.vector_dir = self.settings.check_path(os.environ.get(VECTOR_DIR_ENV) or "steering-vectors",
                                                   "vector dir (--steering-vector-dir)")
        self.built: dict[str, dict[int, torch.Tensor]] = {}  # vectors built over HTTP: name -> layer -> v
        self._lens, self._tokenizer = None, None
        self._records: dict[str, object] = {}  # SAE name -> FeatureRecords or None
        self.labels = {name: load_labels(path, self.facts.saes[name].d_sae) for name, path in self.settings.labels.items()}
        for path in sorted(self.vector_dir.glob("*.safetensors")) if self.vector_dir.is_dir() else ():
            self._adopt(path)

    def _adopt(self, path: Path) -> None:
        from sae_steer.formats import load_vector
        layers = load_vector(path)
        if layers and set(layers) <= self.facts.steerable_layers and path.stem not in self.facts.vectors \
                and all(v.shape[0] == self.facts.d_model for v in layers.values()):
            self.built[path.stem] = layers

    # ---- steering with built vectors: expanded to inline vectors, so workers need no new files ----

    def check_steering(self, raw) -> Admitted:
        """Validate against the served model and the built vectors (so errors name the user's own fields);
        each built vector becomes inline vectors, one per layer. The result is what vLLM's admission takes
        without parsing it again."""
        built = {name: frozenset(layers) for name, layers in self.built.items()}
        steering = parse_steering(raw, replace(self.facts, vectors={**self.facts.vectors, **built}))
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

    def logit_lens(self) -> LogitLens:
        """The served model's final norm and unembedding, read from its safetensors on first use."""
        with self._load_lock:
            return self._load_logit_lens()

    def _load_logit_lens(self) -> LogitLens:
        if self._lens is None:
            from safetensors import safe_open
            from sae_steer.formats import load_sae
            config = json.loads((self.model_path / "config.json").read_text())
            found = {}
            for file in sorted(self.model_path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for key in set(f.keys()) & {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"}:
                        found[key] = f.get_tensor(key).float()
            unembed = found.get("lm_head.weight", found.get("model.embed_tokens.weight"))
            if unembed is None or "model.norm.weight" not in found:
                raise RuntimeError(f"cannot find the final norm / unembedding in {self.model_path}")
            norm = found["model.norm.weight"]
            if config.get("model_type", "").startswith("gemma"):
                norm = 1.0 + norm  # Gemma's RMSNorm scales by (1 + w)
            saes = {name: load_sae(path, self.settings.layer_of.get(name))
                    for name, path in self.settings.saes.items()}
            self._lens = LogitLens(saes, norm, float(config.get("rms_norm_eps", 1e-6)), unembed)
        return self._lens


def state(request: Request) -> SteeringState:
    return request.app.state.sae_steer
