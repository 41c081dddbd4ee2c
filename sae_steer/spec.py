"""The `steering` object of a request: pydantic models and validation against the served model.

parse_steering(raw, facts) raises SteeringError with the offending field's path
(e.g. `steering.interventions[2].feature`): shape/type checks (pydantic) and the checks that need
the model (known SAE/vector names, feature range, vector length, layer range, number of
interventions, finite and bounded magnitudes), after resolving "auto" (resolve_auto, from the calibrations
that sae_steer.calibration stores).

Each request's steering is parsed once per process: in the front end (the HTTP server's check, or
vLLM's admission: `validate_params`), which sends `Steering.wire()` to the workers, and once in the
worker, from that plain data (only plain data crosses the process boundary). An `Admitted` is a
Steering already checked in this process: admission takes it as is.
"""
from __future__ import annotations

import hashlib
import json
import math
import reprlib
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SteeringError(ValueError):
    """Invalid steering; `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class When(_Strict):
    """Apply the intervention only at positions where `feature` (same SAE) is above `above`."""
    feature: int = Field(ge=0)
    above: float = 0.0


class SaeIntervention(_Strict):
    type: Literal["sae"]
    sae: str
    feature: int = Field(ge=0)
    mode: Literal["add", "clamp", "ablate", "scale"]
    strength: float | None = None  # add (also accepted as the factor of scale)
    value: float | None = None  # clamp
    factor: float | None = None  # scale
    when: When | None = None

    @model_validator(mode="after")
    def _one_parameter(self):
        wanted = {"add": ("strength",), "clamp": ("value",), "ablate": (), "scale": ("factor", "strength")}[self.mode]
        given = [n for n in ("strength", "value", "factor") if getattr(self, n) is not None]
        stray = [n for n in given if n not in wanted]
        if stray:
            raise ValueError(f"field {stray[0]!r} does not apply to mode {self.mode!r}")
        if wanted and not given:
            raise ValueError(f"mode {self.mode!r} needs {wanted[0]!r}")
        if len(given) > 1:
            raise ValueError(f"give one of {list(wanted)}, not both")
        return self

    def edit_coefficients(self) -> tuple[float, float]:
        """(a, b) with f' = a f + b: the four modes as one affine map."""
        if self.mode == "add":
            return 1.0, self.strength
        if self.mode == "clamp":
            return 0.0, self.value
        if self.mode == "ablate":
            return 0.0, 0.0
        return (self.factor if self.factor is not None else self.strength), 0.0


class VectorIntervention(_Strict):
    type: Literal["vector"]
    vector: str | None = None  # a registered vector, applied at each of its layers
    values: list[float] | None = None  # an inline vector, applied at `layer`
    layer: int | None = None
    coef: float = 1.0

    @model_validator(mode="after")
    def _one_source(self):
        if (self.vector is None) == (self.values is None):
            raise ValueError("give exactly one of 'vector' (a registered name) or 'values'")
        if self.values is not None and self.layer is None:
            raise ValueError("an inline vector ('values') needs 'layer'")
        return self


class LogitIntervention(_Strict):
    """Adds `strength` times feature `feature`'s direct effect on the logits to this request's logits at
    every sampled token (formula: vllm_plugin/logit_bias.py; `strength` is in logits at the most affected
    token). It acts on logits, not on the residual stream, so `positions` does not apply to it."""
    type: Literal["logit"]
    sae: str
    feature: int = Field(ge=0)
    strength: float


Intervention = Annotated[Union[SaeIntervention, VectorIntervention, LogitIntervention], Field(discriminator="type")]


class Steering(_Strict):
    interventions: list[Intervention] = Field(min_length=1)
    positions: Literal["all", "prompt", "generated"] = "all"  # residual-stream edits only (not `logit`)

    def wire(self) -> dict:
        """The plain data that crosses the process boundary to the workers ("auto" already resolved)."""
        return self.model_dump(mode="json", exclude_none=True)

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the forward pass (cache salt, slot sharing)."""
        return hashlib.sha256(json.dumps(self.wire(), sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SaeFacts:
    d_sae: int
    layer: int
    architecture: str
    d_model: int
    normalize_activations: str = "none"  # SparseAutoencoder.normalize_activations
    n_params: int = 0  # float parameters once loaded (memory budget: 4 bytes each in float32)


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the served model and the registered SAEs/vectors."""
    d_model: int
    num_layers: int
    steerable_layers: frozenset[int]
    saes: dict[str, SaeFacts] = field(default_factory=dict)
    vectors: dict[str, frozenset[int]] = field(default_factory=dict)  # name -> its layers
    max_interventions: int = 64
    max_abs_value: float = 1e4  # |strength|, |value|, |factor|, |coef|, |above|, |values[i]|
    logit_refusal: str | None = None  # why this engine refuses `logit` interventions (None: it serves them)
    calibrations: dict[str, dict] = field(default_factory=dict)  # name -> stored calibration (calibration.py)


@dataclass(frozen=True, eq=False)
class Admitted:
    """A Steering parsed and checked against `facts` in this process (the HTTP server does so before it
    hands a request to vLLM): parse_steering returns it as is for the same facts. Immutable, so a deep copy
    (vLLM deep-copies a request's params) is the object itself, still tied to the very facts it was checked
    against."""
    steering: Steering
    facts: ModelFacts

    def __deepcopy__(self, memo):
        return self


def _path(loc) -> str:
    out = "steering"
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and isinstance(loc[i - 1], int) and part in ("sae", "vector", "logit"):
            continue  # pydantic's discriminator tag after a list index, not a field the user wrote
        else:
            out += f".{part}"
    return out


def parse_steering(raw, facts: ModelFacts) -> Steering:
    """Validate a request's `steering` object; raises SteeringError naming the field."""
    if isinstance(raw, Admitted):
        if raw.facts is facts:
            return raw.steering
        raw = raw.steering.wire()  # checked against another engine's facts: check again
    if not isinstance(raw, dict):
        raise SteeringError("steering", f"must be an object, got {type(raw).__name__}")
    for key in ("telemetry", "compare"):
        if key in raw:
            raise SteeringError(f"steering.{key}", f"`{key}` is answered by the HTTP server (sae-steer serve); "
                                                   "offline requests carry interventions and positions only")
    raw = resolve_auto(raw, facts.calibrations)  # "coef"/"strength": "auto" -> the calibrated numbers
    n = raw.get("interventions")
    if isinstance(n, list) and len(n) > facts.max_interventions:
        raise SteeringError("steering.interventions",
                            f"{len(n)} interventions, at most {facts.max_interventions} are allowed")
    try:
        steering = Steering.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise SteeringError(_path(err["loc"]), err["msg"]) from None
    for i, iv in enumerate(steering.interventions):
        _check_intervention(iv, f"steering.interventions[{i}]", facts)
    return steering


AUTO = "auto"  # a calibrated `coef` / `strength` (sae_steer.calibration stores them)


def resolve_auto(raw, calibrations: dict[str, dict]):
    """The `steering` object with every "auto" replaced by its calibrated number (a new object; `raw` is not
    changed): `calibrations` are the stored files' contents (sae_steer.calibration, ModelFacts.calibrations).
    For a vector with several layers and no `layer` in the request, `layer` is set to the calibrated one; with
    a `layer`, that layer's own best coef is used. It runs in parse_steering, so admission (validate_params,
    the HTTP server's check) refuses "auto" without a calibration with an error naming the field, and the
    front end hands the worker the resolved numbers (vllm_plugin/frontend.py): "auto" is served exactly as
    the same request with the numbers written out. Anything malformed is left for pydantic to report."""
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


_ECHO = reprlib.Repr()  # (attributes, not keywords: Python 3.10/3.11)
_ECHO.maxlevel, _ECHO.maxstring, _ECHO.maxother, _ECHO.maxlist, _ECHO.maxdict = 3, 60, 60, 6, 6


def echo(value) -> str:
    """A client's value in an error message: bounded in depth and length (a deeply nested or huge value must
    neither overflow the interpreter's recursion limit nor be copied into the message)."""
    return _ECHO.repr(value)


def _check_number(x: float | None, where: str, limit: float) -> None:
    if x is not None and (not math.isfinite(x) or abs(x) > limit):
        raise SteeringError(where, f"must be finite with magnitude <= {limit:g}, got {echo(x)}")


def _check_intervention(iv, where: str, facts: ModelFacts) -> None:
    lim = facts.max_abs_value
    if isinstance(iv, LogitIntervention):
        if facts.logit_refusal is not None:
            raise SteeringError(f"{where}.type", facts.logit_refusal)
        sae = facts.saes.get(iv.sae)
        if sae is None:
            raise SteeringError(f"{where}.sae", f"unknown SAE {iv.sae!r}; registered: {sorted(facts.saes)}")
        if iv.feature >= sae.d_sae:
            raise SteeringError(f"{where}.feature", f"feature {iv.feature} is out of range for SAE "
                                                     f"{iv.sae!r} (d_sae={sae.d_sae})")
        _check_number(iv.strength, f"{where}.strength", lim)
        return
    if isinstance(iv, SaeIntervention):
        sae = facts.saes.get(iv.sae)
        if sae is None:
            raise SteeringError(f"{where}.sae", f"unknown SAE {iv.sae!r}; registered: {sorted(facts.saes)}")
        for name in ("strength", "value", "factor"):
            _check_number(getattr(iv, name), f"{where}.{name}", lim)
        if iv.feature >= sae.d_sae:
            raise SteeringError(f"{where}.feature", f"feature {iv.feature} is out of range for SAE "
                                                     f"{iv.sae!r} (d_sae={sae.d_sae})")
        if iv.when is not None:
            if iv.when.feature >= sae.d_sae:
                raise SteeringError(f"{where}.when.feature", f"feature {iv.when.feature} is out of range "
                                                              f"for SAE {iv.sae!r} (d_sae={sae.d_sae})")
            _check_number(iv.when.above, f"{where}.when.above", lim)
        return
    _check_number(iv.coef, f"{where}.coef", lim)
    if iv.vector is not None:
        if iv.vector not in facts.vectors:
            raise SteeringError(f"{where}.vector", f"unknown vector {iv.vector!r}; registered: {sorted(facts.vectors)}")
        if iv.layer is not None and iv.layer not in facts.vectors[iv.vector]:
            raise SteeringError(f"{where}.layer", f"vector {iv.vector!r} has no layer {iv.layer} "
                                                   f"(it has {sorted(facts.vectors[iv.vector])})")
        return
    if not 0 <= iv.layer < facts.num_layers:
        raise SteeringError(f"{where}.layer", f"layer {iv.layer} is out of range (the model has "
                                               f"{facts.num_layers} layers, 0-based)")
    if iv.layer not in facts.steerable_layers:
        raise SteeringError(f"{where}.layer", f"layer {iv.layer} is not steerable on this server; steerable "
                                               f"layers: {sorted(facts.steerable_layers)} (sae_steer.layers setting)")
    if len(iv.values) != facts.d_model:
        raise SteeringError(f"{where}.values", f"has length {len(iv.values)}, the model's d_model is {facts.d_model}")
    for j, v in enumerate(iv.values):
        _check_number(v, f"{where}.values[{j}]", lim)


MAX_TELEMETRY_TOP_K = 256
OBSERVER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")  # ids name files: no dots, no slashes


def check_observer_id(raw, where: str) -> str:
    """An id made by the HTTP server (uuid hex) that names the observer's files in the runtime directory."""
    if not isinstance(raw, str) or not OBSERVER_ID.fullmatch(raw):
        raise SteeringError(where, f"must be 1-64 letters, digits or '-' (not starting with '-'), got {echo(raw)}")
    return raw


def parse_telemetry(raw, facts: ModelFacts, where: str = "telemetry", internal: bool = False) -> dict:
    """The `telemetry` object: {"sae": NAME, "top_k": K} -> the same dict, validated.

    internal=True: the object the HTTP server puts in `extra_args` (key observers.TELEMETRY_KEY),
    which also carries the server-made `id`; a client never supplies the id."""
    if not isinstance(raw, dict):
        raise SteeringError(where, f"must be an object, got {type(raw).__name__}")
    expected = ("sae", "top_k", "id") if internal else ("sae", "top_k")
    unknown = sorted(str(k) for k in set(raw) - set(expected))
    if unknown:
        raise SteeringError(f"{where}.{unknown[0]}", f"unknown field; expected {list(expected)}")
    sae = raw.get("sae")
    if not isinstance(sae, str) or sae not in facts.saes:
        raise SteeringError(f"{where}.sae", f"unknown SAE {echo(sae)}; registered: {sorted(facts.saes)}")
    k = raw.get("top_k", 5)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_TELEMETRY_TOP_K:
        raise SteeringError(f"{where}.top_k", f"must be an integer in 1..{MAX_TELEMETRY_TOP_K}, got {echo(k)}")
    out = {"sae": sae, "top_k": k}
    if internal:
        out["id"] = check_observer_id(raw.get("id"), f"{where}.id")
    return out


CAPTURE_POSITIONS = ("last", "all")


def parse_capture(raw, facts: ModelFacts, where: str = "capture") -> dict:
    """The capture object put in `extra_args` (observers.CAPTURE_KEY) by the HTTP server to build a CAA
    vector, or by sae_steer.capture to record activations at scale: {"id": ID, "layers": [L, ...],
    "positions": "last" (default: the last prompt position) | "all" (every prompt position)}
    -> the same dict, validated."""
    if not isinstance(raw, dict):
        raise SteeringError(where, f"must be an object, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in set(raw) - {"id", "layers", "positions"})
    if unknown:
        raise SteeringError(f"{where}.{unknown[0]}", "unknown field; expected ['id', 'layers', 'positions']")
    positions = raw.get("positions", "last")
    if positions not in CAPTURE_POSITIONS:
        raise SteeringError(f"{where}.positions", f"must be one of {list(CAPTURE_POSITIONS)}, got {echo(positions)}")
    return {"id": check_observer_id(raw.get("id"), f"{where}.id"),
            "layers": check_capture_layers(raw.get("layers"), facts, f"{where}.layers"), "positions": positions}


def check_capture_layers(layers, facts: ModelFacts, where: str = "layers") -> list[int]:
    """Layers at which the residual stream can be read (the steerable ones)."""
    if not isinstance(layers, list) or not layers or not all(isinstance(L, int) and not isinstance(L, bool)
                                                             for L in layers):
        raise SteeringError(where, "must be a non-empty list of layer indices")
    if len(layers) > facts.num_layers:
        raise SteeringError(where, f"{len(layers)} layers; the model has {facts.num_layers}")
    for i, layer in enumerate(layers):
        if layer not in facts.steerable_layers:
            raise SteeringError(f"{where}[{i}]", f"layer {layer} is not steerable on this server; steerable layers: "
                                                 f"{sorted(facts.steerable_layers)} (sae_steer.layers setting)")
    return sorted(set(layers))
