"""Read-only observers of the residual stream, for the HTTP extension: telemetry and capture.

They run in the worker (inside the steering op) and hand their results to the API process through
files in a private runtime directory on the same host, named by a server-made id; a request never
names a path. Both cost a host sync, so they run only for rows that asked for them.

    telemetry  {"id", "sae", "top_k"}: at the SAE's layer, for every position that produces a
               generated token (the last prompt position and each generated token's own position),
               the top-k features of the (steered) residual stream -> <id>.telemetry.jsonl
    capture    {"id", "layers"}: the residual stream at the last prompt position, at each layer
               (for building CAA vectors on the served model) -> <id>.L<layer>.safetensors
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TELEMETRY_KEY = "sae_steer_telemetry"
CAPTURE_KEY = "sae_steer_capture"


def runtime_dir() -> Path:
    path = Path(os.environ.get("SAE_STEER_RUNTIME_DIR") or Path(tempfile.gettempdir()) / f"sae-steer-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _file(observer_id: str, suffix: str) -> Path:
    if not observer_id.replace("-", "").isalnum():
        raise ValueError(f"bad observer id {observer_id!r}")
    return runtime_dir() / f"{observer_id}{suffix}"


# ---- worker side ----

def record_telemetry(observer_id: str, positions: list[int], indices: list[list[int]], values: list[list[float]]) -> None:
    with open(_file(observer_id, ".telemetry.jsonl"), "a") as f:
        for p, i, v in zip(positions, indices, values):
            f.write(json.dumps({"position": p, "features": i, "activations": v}) + "\n")


def record_capture(observer_id: str, layer: int, x: torch.Tensor) -> None:
    tmp = _file(observer_id, f".L{layer}.tmp")
    save_file({"x": x.detach().float().cpu().contiguous()}, str(tmp))
    tmp.rename(_file(observer_id, f".L{layer}.safetensors"))  # atomic: readers never see half a file


# ---- API side ----

def read_telemetry(observer_id: str) -> dict[int, dict]:
    """position -> record; a recomputed position (after preemption) keeps its last record."""
    path = _file(observer_id, ".telemetry.jsonl")
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.endswith("}"):
            record = json.loads(line)
            out[record["position"]] = record
    return out


def read_capture(observer_id: str, layer: int) -> torch.Tensor | None:
    path = _file(observer_id, f".L{layer}.safetensors")
    return load_file(str(path))["x"] if path.exists() else None


def discard(observer_id: str) -> None:
    for path in runtime_dir().glob(f"{observer_id}.*"):
        path.unlink(missing_ok=True)
