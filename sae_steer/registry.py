"""Named SAEs and steering vectors, from the operator's settings.

Settings live in vLLM's own config channel, `additional_config["sae_steer"]`:
    {"saes": {"my-sae": "./saes/l6/"},                # name -> SAE file or folder
     "vectors": {"calm": "./vectors/calm.safetensors"}, # name -> vector file
     "layers": [2, 6] | "all",                         # extra steerable layers (inline vectors)
     "max_interventions": 64, "max_abs_value": 1e4}
Paths the operator configures are trusted; requests only name registered entries.
Steerable layers = the layers of registered SAEs and vectors + `layers`. Only those layers
get the steering op in the compiled graph, so unsteerable layers cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_steer import formats
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import ModelFacts

SETTINGS_KEY = "sae_steer"


@dataclass(frozen=True)
class Settings:
    saes: dict[str, Path] = field(default_factory=dict)
    vectors: dict[str, Path] = field(default_factory=dict)
    layers: tuple[int, ...] | str = ()
    max_interventions: int = 64
    max_abs_value: float = 1e4

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "Settings | None":
        """None when the engine was not configured for steering."""
        raw = (additional_config or {}).get(SETTINGS_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError(f"additional_config.{SETTINGS_KEY} must be an object, got {type(raw).__name__}")
        unknown = set(raw) - {"saes", "vectors", "layers", "max_interventions", "max_abs_value"}
        if unknown:
            raise ValueError(f"additional_config.{SETTINGS_KEY}: unknown setting(s) {sorted(unknown)}")
        named = {}
        for key in ("saes", "vectors"):
            entries = raw.get(key, {})
            if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
                raise ValueError(f"additional_config.{SETTINGS_KEY}.{key} must map names to paths")
            named[key] = {name: Path(p).expanduser().resolve() for name, p in entries.items()}
        clash = set(named["saes"]) & set(named["vectors"])
        if clash:
            raise ValueError(f"additional_config.{SETTINGS_KEY}: names used for both an SAE and a vector: {sorted(clash)}")
        layers = raw.get("layers", ())
        if layers != "all":
            if not isinstance(layers, (list, tuple)) or not all(isinstance(L, int) and L >= 0 for L in layers):
                raise ValueError(f"additional_config.{SETTINGS_KEY}.layers must be \"all\" or a list of layer indices")
            layers = tuple(sorted(set(layers)))
        return cls(saes=named["saes"], vectors=named["vectors"], layers=layers,
                   max_interventions=int(raw.get("max_interventions", 64)),
                   max_abs_value=float(raw.get("max_abs_value", 1e4)))

    def model_facts(self, d_model: int, num_layers: int) -> ModelFacts:
        """Read every registered file's header and check it against the served model."""
        saes = {}
        for name, path in self.saes.items():
            facts = formats.read_sae_facts(path)
            _check_fits(f"SAE {name!r} ({path})", facts.d_model, facts.layer, d_model, num_layers)
            saes[name] = facts
        vectors = {}
        for name, path in self.vectors.items():
            layers = formats.read_vector_layers(path)
            if not layers:
                raise ValueError(f"vector {name!r} ({path}) holds no layer")
            for layer, length in layers.items():
                _check_fits(f"vector {name!r} ({path})", length, layer, d_model, num_layers)
            vectors[name] = frozenset(layers)
        extra = range(num_layers) if self.layers == "all" else self.layers
        for layer in extra:
            if layer >= num_layers:
                raise ValueError(f"additional_config.{SETTINGS_KEY}.layers: layer {layer} is out of range "
                                 f"(the model has {num_layers} layers)")
        steerable = frozenset(extra) | {s.layer for s in saes.values()} | frozenset().union(*vectors.values())
        return ModelFacts(d_model=d_model, num_layers=num_layers, steerable_layers=steerable, saes=saes,
                          vectors=vectors, max_interventions=self.max_interventions,
                          max_abs_value=self.max_abs_value)


def _check_fits(what: str, length: int, layer: int, d_model: int, num_layers: int) -> None:
    if length != d_model:
        raise ValueError(f"{what} has d_model {length}, the served model has d_model {d_model}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"{what} is at layer {layer}, the served model has layers 0..{num_layers - 1}")


@dataclass
class Registry:
    """The loaded SAEs and vectors of one worker, on its device, in float32."""
    saes: dict[str, SparseAutoencoder]
    vectors: dict[str, dict[int, torch.Tensor]]

    @classmethod
    def load(cls, settings: Settings, device: torch.device) -> "Registry":
        saes = {}
        for i, (name, path) in enumerate(settings.saes.items(), 1):
            print(f"[sae-steer] loading SAE {i}/{len(settings.saes)} {name!r} from {path}", flush=True)
            saes[name] = formats.load_sae(path).to(device=device, dtype=torch.float32)
        vectors = {name: {L: v.to(device) for L, v in formats.load_vector(path).items()}
                   for name, path in settings.vectors.items()}
        return cls(saes=saes, vectors=vectors)
