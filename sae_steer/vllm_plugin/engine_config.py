"""What a steering engine selects in vLLM's config, and nothing for engines without sae_steer settings.

Installed in every vLLM process (the config is built in the front end and pickled to the workers).
Each wrapper first asks whether this config has sae_steer settings; without them it returns vLLM's
own result untouched, so an engine without steering runs exactly as vanilla vLLM.

For a steering engine:
- model runner: Model Runner V2 has no per-request logits-processor channel that sae-steer can use
  (V2 refuses V1-interface processors, and its own interface gives no persistent-batch row map
  before the forward), so steering is reported to vLLM as a feature V2 does not support: vLLM then
  picks V1 itself and logs why. An explicit VLLM_USE_V2_MODEL_RUNNER=1 is refused at startup.
- CUDA graphs (CUDA platforms only; the CPU build has none):
    mode left unset      -> vLLM's own default (FULL_AND_PIECEWISE), as for any engine: decode steps replay
                            full graphs with the op inside (see FULL below), mixed batches run piecewise
                            graphs with the op captured inside them too.
    PIECEWISE            -> the op is added to splitting_ops: its Python body runs at every step between
                            captured pieces, so telemetry and capture work (ask for this mode to serve them).
    FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE
                         -> kept. The op is captured inside the full graphs and the table runs its
                            graph-safe path (fixed-address buffers updated in place before each step, one
                            kernel per layer reading the live counts on the device), so steering is replayed
                            exactly; telemetry and capture, which need the host at every step, are refused at
                            admission with a 400 naming the field (logits_processor.validate_params). Being
                            graph-safe, the op is not made a split point: the piecewise graphs of mixed
                            batches capture it too, with no extra piece per steerable layer.
    NONE                 -> eager op, nothing to do.
- compile cache: vLLM keys its saved graphs by the config's hash, which does not see the plugin's
  code. The hash of a steering engine also covers sae-steer's version and the source of the op,
  the adapters and the table, so an upgrade that moves the op never reloads a stale graph.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from importlib import metadata
from pathlib import Path

from sae_steer.vllm_plugin.engine_options import choose_scheduling, full_graphs

logger = logging.getLogger("vllm.sae_steer")

STEERING_OP = "sae_steer::steer_residual"
_SOURCES = ("vllm_plugin/steering_op.py", "vllm_plugin/adapters.py", "vllm_plugin/table.py")


def has_steering(config) -> bool:
    from sae_steer.registry import SETTINGS_KEY
    additional = getattr(config, "additional_config", None)
    return isinstance(additional, dict) and additional.get(SETTINGS_KEY) is not None


@functools.lru_cache(maxsize=1)
def plugin_code_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    try:
        h.update(metadata.version("sae-steer").encode())
    except metadata.PackageNotFoundError:
        h.update(b"source-tree")
    for rel in _SOURCES:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def choose_graph_settings(compilation_config, cuda: bool, before_post_init: bool) -> None:
    """The cudagraph choices above, applied to a CompilationConfig (pure: unit-tested without a GPU)."""
    from vllm.config import CompilationMode
    if before_post_init:
        if cuda and compilation_config.cudagraph_mode is None:
            logger.info("sae-steer: vLLM's default cudagraph mode for this steering engine: full graphs replay "
                        "steering (graph-safe table), and telemetry/capture requests are refused; serve them with "
                        "-cc.cudagraph_mode=PIECEWISE")
        return
    if full_graphs(compilation_config):
        logger.info("sae-steer: cudagraph_mode %s: steering runs inside full CUDA graphs (graph-safe table, so the "
                    "op is no split point of the piecewise ones either); telemetry and capture requests are refused",
                    compilation_config.cudagraph_mode.name)
    elif compilation_config.mode == CompilationMode.VLLM_COMPILE and compilation_config.splitting_ops is not None \
            and STEERING_OP not in compilation_config.splitting_ops:
        compilation_config.splitting_ops.append(STEERING_OP)


def install() -> None:
    """Wrap VllmConfig's runner choice, post-init and hash. Raises LookupError naming a missing piece."""
    from vllm.config import VllmConfig
    from vllm.platforms import current_platform

    def original(name):
        fn = VllmConfig.__dict__.get(name)
        if fn is None:
            raise LookupError(f"vllm.config.VllmConfig.{name}")
        return fn

    unsupported, post_init, compute_hash = (original(n) for n in (
        "_get_v2_model_runner_unsupported_features", "__post_init__", "compute_hash"))
    if getattr(post_init, "_sae_steer_wrapped", False):
        return

    def _get_v2_model_runner_unsupported_features(self):
        features = unsupported(self)
        if has_steering(self):
            features = [*features, "sae-steer steering (its per-request channel is the V1 logits-processor interface)"]
        return features

    def __post_init__(self):
        steering = has_steering(self)
        if steering:
            choose_graph_settings(self.compilation_config, current_platform.is_cuda_alike(), before_post_init=True)
            choose_scheduling(self.scheduler_config, current_platform.is_cuda_alike())
        post_init(self)
        if steering:
            choose_graph_settings(self.compilation_config, current_platform.is_cuda_alike(), before_post_init=False)

    def _compute_hash(self, *args, **kwargs):
        digest = compute_hash(self, *args, **kwargs)
        if not has_steering(self):
            return digest
        return hashlib.sha256(f"{digest}|sae-steer:{plugin_code_hash()}".encode()).hexdigest()[: len(digest)]

    for name, fn, orig in (("_get_v2_model_runner_unsupported_features", _get_v2_model_runner_unsupported_features,
                            unsupported), ("__post_init__", __post_init__, post_init),
                           ("compute_hash", _compute_hash, compute_hash)):
        functools.update_wrapper(fn, orig)
        fn._sae_steer_wrapped = True
        setattr(VllmConfig, name, fn)
