"""Calibrated steering settings, stored beside the vector or SAE they belong to, and `"auto"` in requests.

`sae-steer eval` (sae_steer/evaluate.py) picks, per vector or SAE feature, the layer and strength that
maximise the harmonic mean of its judges on held-out instructions and writes them here:

    vector file  <vector>.calibration.json     e.g. ./vectors/cold.safetensors.calibration.json
        {"kind": "vector", "layer": 15, "coef": 1.0, "score": 0.81,
         "per_layer": {"6": {"coef": 0.5, "score": 0.42}, "10": {...}, "15": {...}}, "source": {...}}
    SAE folder   <sae_dir>/calibration.json   (an SAE given as one file: <file>.calibration.json)
        {"kind": "sae", "features": {"1234": {"add": {"strength": 12.0, "score": 0.6},
                                              "logit": {"strength": 6.0, "score": 0.7}}}, "source": {...}}

A request then writes `"coef": "auto"` (registered vector) or `"strength": "auto"` (SAE `add`, and `logit`):
sae_steer.spec.resolve_auto replaces it by the stored number, from the calibrations this module loads
(load_for_settings -> ModelFacts.calibrations); resolving is part of parsing a request, so it lives there and
this module knows nothing of requests. Calibrations are read when the engine reads its settings (startup): a
calibration written later is used after a restart.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

SUFFIX = ".calibration.json"
SAE_FILE = "calibration.json"


def calibration_path(path: str | Path, kind: str) -> Path:
    """Where the calibration of a vector file / SAE (folder or file) lives."""
    path = Path(path)
    if kind == "sae" and path.is_dir():
        return path / SAE_FILE
    return path.with_name(path.name + SUFFIX)


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    return path


def _number(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {x!r}")
    return float(x)


def save_vector_calibration(vector_path: str | Path, layer: int, coef: float, *, score: float | None = None,
                            per_layer: dict[int, dict] | None = None, source: dict | None = None) -> Path:
    entry = {"kind": "vector", "layer": int(layer), "coef": _number(coef, "coef"), "score": score,
             "per_layer": {str(L): v for L, v in sorted((per_layer or {}).items())}, "source": source or {}}
    return _write_json(calibration_path(vector_path, "vector"), entry)


def save_feature_calibration(sae_path: str | Path, feature: int, kind: str, strength: float, *,
                             score: float | None = None, source: dict | None = None) -> Path:
    """Adds/replaces one feature's `add` or `logit` strength, keeping the other features' entries."""
    if kind not in ("add", "logit"):
        raise ValueError(f"kind must be 'add' or 'logit', got {kind!r}")
    path = calibration_path(sae_path, "sae")
    data = json.loads(path.read_text()) if path.exists() else {"kind": "sae", "features": {}}
    data.setdefault("features", {}).setdefault(str(int(feature)), {})[kind] = {
        "strength": _number(strength, "strength"), "score": score, "source": source or {}}
    return _write_json(path, data)


def load_calibration(path: str | Path, kind: str) -> dict | None:
    """The stored calibration of a vector file or SAE, checked; None when there is none."""
    where = calibration_path(path, kind)
    if not where.is_file():
        return None
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("kind") != kind:
            raise ValueError(f"expected an object with kind {kind!r}")
        if kind == "vector":
            _number(data.get("coef"), "coef")
            if not isinstance(data.get("layer"), int):
                raise ValueError("layer must be an integer")
            for L, entry in data.get("per_layer", {}).items():
                int(L), _number(entry.get("coef"), f"per_layer.{L}.coef")
        else:
            for feature, kinds in data.get("features", {}).items():
                int(feature)
                for k, entry in kinds.items():
                    _number(entry.get("strength"), f"features.{feature}.{k}.strength")
    except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"calibration file {where}: {e}") from None
    return data


def load_for_settings(saes: dict[str, Path], vectors: dict[str, Path]) -> dict[str, dict]:
    """name -> calibration, for every registered SAE and vector that has one (ModelFacts.calibrations)."""
    out = {}
    for kind, entries in (("sae", saes), ("vector", vectors)):
        for name, path in entries.items():
            data = load_calibration(path, kind)
            if data is not None:
                out[name] = data
    return out
