"""Named SAEs and steering vectors, from the operator's settings.

Settings live in vLLM's own config channel, `additional_config["sae_steer"]`:
    {"saes": {"my-sae": "./saes/l6/",                   # name -> SAE file or folder (any format of
              "gs": {"path": "./params.npz", "layer": 6}},  #   sae_steer.formats), or {path, layer}
     "vectors": {"calm": "./vectors/calm.safetensors",  # name -> vector file (.safetensors, .gguf, .npy)
                 "one": {"path": "./one.npy", "layer": 6}},
     "layers": [2, 6] | "all",                         # extra steerable layers (inline vectors)
     "max_interventions": 64, "max_abs_value": 1e4,
     "max_memory_mb": 2048,                            # budget for the loaded SAEs + vectors (float32, + the
                                                       #   steering table's copy in the serving dtype on a GPU)
     "sae_weight_dtype": "serving" | "float32",        # the steering kernels' copy of the SAE weights on a GPU
     "roots": ["/srv/steering"],                       # when set, every path must lie under one of them
     "labels": {"my-sae": "./labels/l6.json"}}         # Neuronpedia-style feature labels per SAE
Paths the operator configures are trusted, but with `roots` each must resolve (symlinks followed)
under a root, as must any file the server writes (`Settings.check_path`). Requests only name
registered entries. Steerable layers = the layers of registered SAEs and vectors + `layers`. Only
those layers get the steering op in the compiled graph, so unsteerable layers cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_steer import calibration, formats
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import ModelFacts

SETTINGS_KEY = "sae_steer"
_KEYS = {"saes", "vectors", "layers", "max_interventions", "max_abs_value", "max_memory_mb", "roots", "labels",
         "sae_weight_dtype"}
WEIGHT_DTYPES = ("serving", "float32")


def _key(name: str) -> str:
    return f"additional_config.{SETTINGS_KEY}.{name}"


@dataclass(frozen=True)
class Settings:
    saes: dict[str, Path] = field(default_factory=dict)
    vectors: dict[str, Path] = field(default_factory=dict)
    layers: tuple[int, ...] | str = ()
    max_interventions: int = 64
    max_abs_value: float = 1e4
    layer_of: dict[str, int] = field(default_factory=dict)  # SAE/vector name -> layer given beside its path
    max_memory_mb: float | None = None
    roots: tuple[Path, ...] = ()  # resolved
    labels: dict[str, Path] = field(default_factory=dict)  # SAE name -> label file
    sae_weight_dtype: str = "serving"  # one of WEIGHT_DTYPES (see packed_weight_dtype)

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "Settings | None":
        """None when the engine was not configured for steering."""
        raw = (additional_config or {}).get(SETTINGS_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError(f"additional_config.{SETTINGS_KEY} must be an object, got {type(raw).__name__}")
        unknown = set(raw) - _KEYS
        if unknown:
            raise ValueError(f"additional_config.{SETTINGS_KEY}: unknown setting(s) {sorted(unknown)}")
        roots = raw.get("roots", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise ValueError(f"{_key('roots')} must be a list of directories")
        roots = tuple(Path(r).expanduser().resolve() for r in roots)
        for root in roots:
            if not root.is_dir():
                raise ValueError(f"{_key('roots')}: {str(root)!r} is not a directory")
        settings = cls(roots=roots)  # for check_path while the rest is parsed

        named, layer_of = {}, {}
        for key in ("saes", "vectors"):
            entries = raw.get(key, {})
            if not isinstance(entries, dict):
                raise ValueError(f"{_key(key)} must map names to paths")
            named[key] = {}
            for name, entry in entries.items():
                where = f"{key}.{name}"
                if isinstance(entry, dict):
                    extra = set(entry) - {"path", "layer"}
                    layer = entry.get("layer")
                    if extra or not isinstance(entry.get("path"), str) or \
                            not (layer is None or (isinstance(layer, int) and layer >= 0)):
                        raise ValueError(f"{_key(where)} must be a path or {{\"path\": str, \"layer\": int >= 0}}")
                    entry, layer_of[name] = entry["path"], layer
                if not isinstance(entry, str):
                    raise ValueError(f"{_key(key)} must map names to paths")
                named[key][name] = settings.check_path(entry, where)
        clash = set(named["saes"]) & set(named["vectors"])
        if clash:
            raise ValueError(f"additional_config.{SETTINGS_KEY}: names used for both an SAE and a vector: {sorted(clash)}")
        layers = raw.get("layers", ())
        if layers != "all":
            if not isinstance(layers, (list, tuple)) or not all(isinstance(L, int) and L >= 0 for L in layers):
                raise ValueError(f"additional_config.{SETTINGS_KEY}.layers must be \"all\" or a list of layer indices")
            layers = tuple(sorted(set(layers)))
        budget = raw.get("max_memory_mb")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise ValueError(f"{_key('max_memory_mb')} must be a positive number of megabytes")
        labels = raw.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError(f"{_key('labels')} must map SAE names to label files")
        stray = set(labels) - set(named["saes"])
        if stray:
            raise ValueError(f"{_key('labels')}: {sorted(stray)} are not registered SAEs")
        weight_dtype = raw.get("sae_weight_dtype", "serving")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{_key('sae_weight_dtype')} must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
        return cls(saes=named["saes"], vectors=named["vectors"], layers=layers, sae_weight_dtype=weight_dtype,
                   max_interventions=int(raw.get("max_interventions", 64)),
                   max_abs_value=float(raw.get("max_abs_value", 1e4)), layer_of=layer_of, max_memory_mb=budget,
                   roots=roots, labels={n: settings.check_path(p, f"labels.{n}") for n, p in labels.items()})

    def packed_weight_dtype(self, cuda: bool, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the steering table's packed SAE weights (`sae_weight_dtype`).

        "serving" on a GPU serving bf16/fp16: that dtype, so the TopK encode runs on tensor cores (fp32
        accumulation) and every kernel reads half the bytes; the registry keeps its fp32 copy beside it
        (telemetry and logit steering read it), so the SAEs then hold 1.5x their fp32 size. On a CPU, or a
        model served in fp32, or with "float32": fp32, held once (the registry's SAEs are views of it). The CPU
        path is a torch matmul, where bf16 is slow without AVX-512 BF16 and bytes are not what limits it."""
        if self.sae_weight_dtype == "serving" and cuda and model_dtype in (torch.bfloat16, torch.float16):
            return model_dtype
        return torch.float32

    def check_path(self, path: str | Path, setting: str = "path") -> Path:
        """The resolved path (symlinks followed); with `roots`, it must lie under one of them.

        For a folder, the entries inside it are checked too: an SAE folder under a root whose
        weights file is a symlink out of it is refused. Also for files the server writes.
        """
        resolved = Path(path).expanduser().resolve()
        if not self.roots:
            return resolved
        inside = [resolved] + (list(resolved.iterdir()) if resolved.is_dir() else [])
        for p in inside:
            real = p.resolve()
            if not any(real == root or root in real.parents for root in self.roots):
                what = "" if p == resolved else f" (its entry {p.name!r} resolves to {str(real)!r})"
                raise ValueError(f"{_key(setting)}: {str(path)!r}{what} is outside the allowed roots "
                                 f"{[str(r) for r in self.roots]} ({_key('roots')})")
        return resolved

    def model_facts(self, d_model: int, num_layers: int, weight_dtype: torch.dtype = torch.float32) -> ModelFacts:
        """Read every registered file's header and check it against the served model and the budget (the
        registry's float32 copies, plus the table's pack where weight_dtype, its dtype, is another)."""
        saes, cost = {}, {}
        for name, path in self.saes.items():
            facts = formats.read_sae_facts(path, self.layer_of.get(name))
            _check_fits(f"SAE {name!r} ({path})", facts.d_model, facts.layer, d_model, num_layers)
            if facts.normalize_activations != "none":
                # The batched steering table folds constant input scales into its weights; a per-token
                # rescale would need a norm per token there, which it does not compute (yet).
                raise ValueError(f"SAE {name!r} ({path}) uses normalize_activations={facts.normalize_activations!r} "
                                 f"(a per-token input rescale): the reference math (sae_steer.sae) supports it, "
                                 f"the engine's steering table does not yet")
            saes[name] = facts
            pack = 0 if weight_dtype == torch.float32 else weight_dtype.itemsize
            cost[f"SAE {name!r}"] = (4 + pack) * facts.n_params
        vectors = {}
        for name, path in self.vectors.items():
            layers = formats.read_vector_layers(path, self.layer_of.get(name))
            if not layers:
                raise ValueError(f"vector {name!r} ({path}) holds no layer")
            for layer, length in layers.items():
                _check_fits(f"vector {name!r} ({path})", length, layer, d_model, num_layers)
            vectors[name] = frozenset(layers)
            cost[f"vector {name!r}"] = 4 * sum(layers.values())
        self._check_budget(cost, weight_dtype)
        extra = range(num_layers) if self.layers == "all" else self.layers
        for layer in extra:
            if layer >= num_layers:
                raise ValueError(f"additional_config.{SETTINGS_KEY}.layers: layer {layer} is out of range "
                                 f"(the model has {num_layers} layers)")
        steerable = frozenset(extra) | {s.layer for s in saes.values()} | frozenset().union(*vectors.values())
        return ModelFacts(d_model=d_model, num_layers=num_layers, steerable_layers=steerable, saes=saes,
                          vectors=vectors, max_interventions=self.max_interventions,
                          max_abs_value=self.max_abs_value,
                          calibrations=calibration.load_for_settings(self.saes, self.vectors))

    def _check_budget(self, cost: dict[str, int], weight_dtype: torch.dtype) -> None:
        """Estimated from headers, before anything is loaded: float32 copies held by the registry, and the
        steering table's pack beside them when it is in another dtype."""
        if self.max_memory_mb is None:
            return
        total = sum(cost.values()) / 2**20
        if total > self.max_memory_mb:
            largest = ", ".join(f"{what} {b / 2**20:.1f} MB" for what, b in sorted(cost.items(), key=lambda kv: -kv[1])[:3])
            held = "in float32" if weight_dtype == torch.float32 else \
                f"in float32 plus the steering table's {str(weight_dtype).removeprefix('torch.')} copy of the SAEs"
            raise ValueError(f"{_key('max_memory_mb')}: the registered SAEs and vectors need about {total:.1f} MB "
                             f"{held} (largest: {largest}), over the budget of {self.max_memory_mb:g} MB")


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
            saes[name] = formats.load_sae(path, settings.layer_of.get(name)).to(device=device, dtype=torch.float32)
        vectors = {name: {L: v.to(device) for L, v in formats.load_vector(path, settings.layer_of.get(name)).items()}
                   for name, path in settings.vectors.items()}
        return cls(saes=saes, vectors=vectors)
