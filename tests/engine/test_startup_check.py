"""Steering reaches the model or the engine refuses to start (DESIGN.md invariant 6).

- a block class that bypasses the forward sae-steer attached (it calls its class's forward from its
  own __call__, as a refactor or a subclass might) -> the startup check finds that the op never ran
  at the steerable layer and refuses, naming the layer and the class, eager and compiled;
- an architecture the family table does not know -> refused by name, with the supported list;
- a block that does not return what its family's row says -> refused at startup.
"""
from __future__ import annotations

import json
import shutil

import pytest

from sae_steer.vllm_plugin import adapters
from tests.engine.conftest import close

pytestmark = pytest.mark.engine


def _llama_classes():
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

    class BypassingLayer(LlamaDecoderLayer):
        def __call__(self, *args, **kwargs):  # the class's forward, not the instance's attached one
            return type(self).forward(self, *args, **kwargs)

    class BypassLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, *, vllm_config, prefix=""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            for layer in self.model.layers:
                layer.__class__ = BypassingLayer

    class HiddenOnlyLayer(LlamaDecoderLayer):
        def forward(self, *args, **kwargs):  # drops the residual: not a "pair" block any more
            return super().forward(*args, **kwargs)[0]

    class HiddenOnlyLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, *, vllm_config, prefix=""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            for layer in self.model.layers:
                layer.__class__ = HiddenOnlyLayer

    return {"BypassLlamaForCausalLM": BypassLlamaForCausalLM, "HiddenOnlyLlamaForCausalLM": HiddenOnlyLlamaForCausalLM,
            "UnknownLlamaForCausalLM": LlamaForCausalLM}


@pytest.fixture(scope="module")
def models(artifacts, tmp_path_factory):
    """A copy of the tiny Llama per test architecture, registered with vLLM under that name."""
    from vllm import ModelRegistry
    root, out = tmp_path_factory.mktemp("startup"), {}
    for arch, cls in _llama_classes().items():
        path = root / arch
        shutil.copytree(artifacts.model, path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
        ModelRegistry.register_model(arch, cls)
        out[arch] = path
    return out


@pytest.fixture
def llama_rows(monkeypatch):
    """The test architectures as Llama-family rows of the adapter table (what a careless new row would do)."""
    llama = adapters.family_of(["LlamaForCausalLM"])
    for arch in ("BypassLlamaForCausalLM", "HiddenOnlyLlamaForCausalLM"):
        monkeypatch.setitem(adapters._BY_ARCHITECTURE, arch, llama)


def start(path, mode, layers=(1, 2)):
    from vllm import LLM
    return LLM(model=str(path), enforce_eager=(mode == "eager"), dtype="float32", max_model_len=256, seed=0,
               block_size=32, max_num_seqs=8, additional_config={"sae_steer": {"layers": list(layers)}})


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_a_block_that_bypasses_the_op_is_refused_at_startup(models, llama_rows, mode):
    with pytest.raises(Exception) as refused:
        llm = start(models["BypassLlamaForCausalLM"], mode)
        close(llm)  # only reached if the engine wrongly started
    message = str(refused.value) + "".join(str(c) for c in (refused.value.__cause__, refused.value.__context__))
    assert "never ran at layer 1" in message and "BypassingLayer" in message, message


def test_a_block_that_breaks_its_family_contract_is_refused_at_startup(models, llama_rows):
    with pytest.raises(Exception) as refused:
        llm = start(models["HiddenOnlyLlamaForCausalLM"], "eager", layers=range(4))
        close(llm)
    message = str(refused.value) + "".join(str(c) for c in (refused.value.__cause__, refused.value.__context__))
    assert "HiddenOnlyLayer" in message and "(hidden_states, residual)" in message, message


def test_an_unknown_family_is_refused_by_name(models):
    with pytest.raises(Exception) as refused:
        llm = start(models["UnknownLlamaForCausalLM"], "eager")
        close(llm)
    message = str(refused.value)
    assert "UnknownLlamaForCausalLM" in message and "GPT2LMHeadModel" in message and "Supported" in message, message


def test_the_same_model_without_steering_settings_starts(models):
    """The refusal is about steering: without sae_steer settings the plugin asks nothing of the family."""
    from vllm import LLM, SamplingParams
    llm = LLM(model=str(models["UnknownLlamaForCausalLM"]), enforce_eager=True, dtype="float32", max_model_len=256,
              block_size=32, max_num_seqs=8)
    try:
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        close(llm)
