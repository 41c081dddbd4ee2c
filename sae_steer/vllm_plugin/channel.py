"""The per-request steering channel is in every steering engine's batch: vLLM's `build_logitsprocs` builds no
entry-point logits processor under speculative decoding, so the plugin wraps it (`install_channel`, run by
`register` in every process) to add sae-steer's processor (vllm_plugin/logits_processor.py) wherever it is
missing."""
from __future__ import annotations

import functools
import logging
import sys

logger = logging.getLogger("vllm.sae_steer")


def install_channel() -> None:
    """Run in every process (`register`): whatever vLLM's `build_logitsprocs` leaves out of a steering engine's
    batch (it builds no entry-point processor under speculative decoding), the batch gets sae-steer's logits
    processor, the per-request channel, whose __init__ installs the worker hooks. Engines without sae_steer
    settings get vLLM's own result."""
    import vllm.v1.sample.logits_processor as builders
    original = builders.build_logitsprocs
    if getattr(original, "_sae_steer_wrapped", False):
        return

    @functools.wraps(original)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, *args, **kwargs):
        built = original(vllm_config, device, is_pin_memory, is_pooling_model, *args, **kwargs)
        # Imported here, when an engine builds its batch: register() runs in every process, before any engine.
        from sae_steer.vllm_plugin.facts import facts_for
        if facts_for(vllm_config) is None:
            return built
        from sae_steer.vllm_plugin.logits_processor import SteeringLogitsProcessor
        ours = sum(isinstance(p, SteeringLogitsProcessor) for p in built.all)
        if ours > 1:  # each instance would apply logit steering again
            raise RuntimeError("sae-steer: logits_processors names sae-steer's processor, which vLLM already loads "
                               "from its entry point: remove it from logits_processors")
        if ours:
            return built
        logger.info("sae-steer: vLLM built this engine's logits processors without sae-steer's (speculative "
                    "decoding?): adding it, the per-request steering channel")
        return builders.LogitsProcessors([*built.all, SteeringLogitsProcessor(vllm_config, device, is_pin_memory)])

    build_logitsprocs._sae_steer_wrapped = True
    builders.build_logitsprocs = build_logitsprocs
    # The runner module binds the name at its import: rebind it there if it was imported before this ran.
    runner_module = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if runner_module is not None:
        if getattr(runner_module, "build_logitsprocs", None) is not original:
            raise LookupError("vllm.v1.worker.gpu_model_runner.build_logitsprocs")
        runner_module.build_logitsprocs = build_logitsprocs
