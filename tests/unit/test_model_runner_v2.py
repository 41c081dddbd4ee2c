"""Model Runner V2 (CUDA's default) loads every `vllm.logits_processors` entry point and refuses
V1-only classes, which would break any V2 engine on a machine with sae-steer installed. V2 cannot
run on CPU, but its loader can: it must accept our entry point."""
from __future__ import annotations

import pytest


def test_v2_loader_accepts_the_entry_point():
    loader = pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor.loader")
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2
    from sae_steer.vllm_plugin.logits_processor import SteeringLogitsProcessor
    loaded = loader._load_v2_logitsprocs_plugins()
    assert SteeringLogitsProcessor in loaded and issubclass(SteeringLogitsProcessor, V2)
    assert SteeringLogitsProcessor.add_request(object.__new__(SteeringLogitsProcessor), 0, None) is False
