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

class TelemetryReader:
    """Reads one request's telemetry file incrementally, so a stream reads each record once.

    `new_records()` returns (token_index, record) for positions not returned before; token_index 0
    is the first position recorded, the last prompt position, which produces generated token 0.
    A position recomputed after preemption is recorded again with the same values and skipped.
    """

    def __init__(self, observer_id: str):
        self.path = _file(observer_id, ".telemetry.jsonl")
        self.offset, self.first, self.seen = 0, None, set()

    def new_records(self) -> list[tuple[int, dict]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        out = []
        for line in complete.decode().splitlines():
            record = json.loads(line)
            if self.first is None:
                self.first = record["position"]
            index = record["position"] - self.first
            if index not in self.seen:
                self.seen.add(index)
                out.append((index, record))
        return out


def read_capture(observer_id: str, layer: int) -> torch.Tensor | None:
    path = _file(observer_id, f".L{layer}.safetensors")
    return load_file(str(path))["x"] if path.exists() else None


def discard(observer_id: str) -> None:
    for path in runtime_dir().glob(f"{observer_id}.*"):
        path.unlink(missing_ok=True)
