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
`resolve_auto` replaces it by the stored number (and, for a vector with several layers and no `layer` in the
request, sets `layer` to the calibrated one; with a `layer`, that layer's own best coef is used). It runs in
`parse_steering`, so admission (validate_params, the HTTP server's check) refuses "auto" without a
calibration with an error naming the field, and the front end hands the worker the resolved numbers
(vllm_plugin/frontend.py), so "auto" is served exactly as the same request with the numbers written out.
Calibrations are read when the engine reads its settings (startup): a calibration written later is used
after a restart.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

AUTO = "auto"
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


def resolve_auto(raw, calibrations: dict[str, dict]):
    """The `steering` object with every "auto" replaced by its calibrated number (a new object; `raw` is not
    changed). Anything malformed is left for pydantic to report; a missing calibration raises SteeringError
    naming the field."""
    from sae_steer.spec import SteeringError
    ivs = raw.get("interventions") if isinstance(raw, dict) else None
    if not isinstance(ivs, list) or not any(isinstance(iv, dict) and AUTO in (iv.get("coef"), iv.get("strength"))
                                            for iv in ivs):
        return raw
    out = []
    for i, iv in enumerate(ivs):
        where = f"steering.interventions[{i}]"
        if not isinstance(iv, dict):
            out.append(iv)
            continue
        iv = dict(iv)
        kind = iv.get("type")
        if iv.get("coef") == AUTO and kind == "vector":
            name = iv.get("vector")
            if not isinstance(name, str):
                raise SteeringError(f"{where}.coef", '"auto" needs a registered vector (`vector`), whose '
                                                     'calibration `sae-steer eval` wrote; an inline vector has none')
            cal = calibrations.get(name)
            if cal is None or cal.get("kind") != "vector":
                raise SteeringError(f"{where}.coef", f'"auto": vector {name!r} has no calibration; run '
                                                     f'`sae-steer eval` to write one beside its file, or give a number')
            layer = iv.get("layer")
            if layer is None:
                iv["layer"], iv["coef"] = cal["layer"], cal["coef"]
            else:
                entry = cal.get("per_layer", {}).get(str(layer)) if isinstance(layer, int) else None
                if entry is None and layer != cal["layer"]:
                    raise SteeringError(f"{where}.coef", f'"auto": vector {name!r} is calibrated at layers '
                                                         f'{sorted({cal["layer"], *map(int, cal.get("per_layer", {}))})}, '
                                                         f'not at layer {layer!r}')
                iv["coef"] = cal["coef"] if entry is None else entry["coef"]
        elif iv.get("strength") == AUTO and kind in ("sae", "logit"):
            what = "logit" if kind == "logit" else iv.get("mode")
            if what not in ("add", "logit"):
                raise SteeringError(f"{where}.strength", f'"auto" is calibrated for mode "add" and type "logit" '
                                                         f'only, not mode {what!r}')
            name, feature = iv.get("sae"), iv.get("feature")
            cal = calibrations.get(name) if isinstance(name, str) else None
            entry = None
            if cal is not None and cal.get("kind") == "sae" and isinstance(feature, int):
                entry = cal.get("features", {}).get(str(feature), {}).get(what)
            if entry is None:
                raise SteeringError(f"{where}.strength", f'"auto": feature {feature!r} of SAE {name!r} has no '
                                                         f'calibrated {what!r} strength; run `sae-steer eval` for '
                                                         f'it, or give a number')
            iv["strength"] = entry["strength"]
        elif AUTO in (iv.get("coef"), iv.get("strength")):
            field = "coef" if iv.get("coef") == AUTO else "strength"
            raise SteeringError(f"{where}.{field}", '"auto" applies to `coef` of a vector and `strength` of an '
                                                    'SAE add or logit intervention')
        out.append(iv)
    return {**raw, "interventions": out}
