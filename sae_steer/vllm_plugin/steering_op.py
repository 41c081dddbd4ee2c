"""The in-model steering op: `torch.ops.sae_steer.steer_residual`, called after each steerable decoder layer.

Why an opaque custom op and not a forward hook: vLLM compiles the model with torch.compile, and
PyTorch forward hooks never fire in the compiled graph (steering would silently vanish). The
decoder layer's `forward` is wrapped before the model is built, so the compiler traces the op
call into the graph; being opaque, its body runs at every step, eager or compiled. Only layers
that can be steered (registry.Settings) get the call, so the rest of the model is untouched.

The body reads the step's `query_start_loc` (token -> persistent-batch row) from vLLM's forward
context and the worker's SteeringTable, which the logits processor fills before the forward.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger("vllm.sae_steer")

# The worker's table, published by SteeringLogitsProcessor.__init__ (one engine per worker process).
_table = None

# Decoder layers whose forward returns (hidden_states, residual) with the residual stream = their sum.
# architecture -> (module, class)
DECODER_LAYERS = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    "MistralForCausalLM": ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
    "Gemma2ForCausalLM": ("vllm.model_executor.models.gemma2", "Gemma2DecoderLayer"),
}
patched_classes: set[type] = set()


def set_table(table) -> None:
    global _table
    _table = table


@torch.library.custom_op("sae_steer::steer_residual", mutates_args=())
def steer_residual(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
    """hidden [T, d] -> hidden + this step's steering delta for every token (residual [T, d] is read only)."""
    if _table is None:
        return hidden.clone()
    from vllm.forward_context import get_forward_context, is_forward_context_available
    if not is_forward_context_available():
        return hidden.clone()
    metadata = get_forward_context().attn_metadata
    if not metadata:  # profiling / warm-up runs carry no requests
        return hidden.clone()
    if isinstance(metadata, list):
        raise RuntimeError("sae-steer does not support micro-batching (dual batch overlap)")
    query_start_loc = next(iter(metadata.values())).query_start_loc
    return _table.apply(layer, hidden, residual, positions, query_start_loc)


@steer_residual.register_fake
def _(hidden, residual, positions, layer):
    return torch.empty_like(hidden)


def _layer_index(module: torch.nn.Module, prefix: str | None) -> int:
    from vllm.model_executor.models.utils import extract_layer_index
    return extract_layer_index(prefix or module.self_attn.attn.layer_name)


def _steerable_layers() -> frozenset[int]:
    """The steerable layers of the engine being built (empty when it has no sae_steer settings)."""
    from vllm.config import get_current_vllm_config_or_none
    from sae_steer.vllm_plugin.facts import facts_for
    config = get_current_vllm_config_or_none()
    facts = facts_for(config) if config is not None else None
    return facts.steerable_layers if facts else frozenset()


def _patch(cls: type) -> None:
    """Wrap cls.__init__ (decide once if this layer is steerable) and cls.forward (call the op)."""
    if cls in patched_classes:
        return
    init, forward = cls.__init__, cls.forward

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        index = _layer_index(self, kwargs.get("prefix"))
        # A plain int or None attribute: torch.compile treats it as a constant of the graph.
        self.sae_steer_layer = index if index in _steerable_layers() else None

    @functools.wraps(forward)
    def steered_forward(self, positions, hidden_states, residual, *args, **kwargs):
        hidden_states, residual = forward(self, positions, hidden_states, residual, *args, **kwargs)
        if self.sae_steer_layer is not None:
            hidden_states = torch.ops.sae_steer.steer_residual(hidden_states, residual, positions,
                                                               self.sae_steer_layer)
        return hidden_states, residual

    cls.__init__, cls.forward = __init__, steered_forward
    patched_classes.add(cls)


def patch_decoder_layers() -> None:
    for module_name, class_name in set(DECODER_LAYERS.values()):
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:  # a vLLM build without that model
            logger.debug("sae-steer: cannot patch %s.%s: %s", module_name, class_name, e)
            continue
        _patch(cls)
