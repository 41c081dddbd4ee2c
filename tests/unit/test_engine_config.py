"""Installed but unused, the plugin changes nothing (DESIGN.md invariant 7); a steering engine gets the V1
runner, a graph mode that keeps steering, and a compile-cache key that covers the plugin's code.

The engine-level proof (unsteered requests bit-identical to vLLM without the plugin, multiprocess) is
tests/engine/test_multiprocess.py; these check the config-level pieces, which on this CPU machine are
the only way to see the CUDA choices."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

SETTINGS = {"sae_steer": {"layers": [1]}}


def test_register_changes_no_environment_variable():
    """In a fresh process: what vLLM's own imports set (e.g. OpenCV's LD_LIBRARY_PATH) is set first, then
    register() must leave os.environ exactly as it found it (no VLLM_USE_V2_MODEL_RUNNER, nothing)."""
    code = ("import os\n"
            "for m in ('vllm.config', 'vllm.v1.engine.input_processor', 'vllm.entrypoints.openai.completion.protocol',"
            " 'vllm.entrypoints.openai.chat_completion.protocol'):\n"
            "    __import__(m)\n"
            "before = dict(os.environ)\n"
            "from sae_steer.vllm_plugin import register\n"
            "from sae_steer.vllm_plugin.wiring import missing_pieces\n"
            "register()\n"
            "assert not missing_pieces, missing_pieces\n"
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
            "assert not changed, changed\n"
            "print('unchanged')\n")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "unchanged" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def VllmConfig():
    from sae_steer.vllm_plugin import engine_config
    engine_config.install()
    from vllm.config import VllmConfig
    return VllmConfig


def test_without_settings_vllm_decides_as_it_would_without_the_plugin(VllmConfig):
    config = VllmConfig()
    unwrapped = {name: getattr(VllmConfig, name).__wrapped__ for name in
                 ("_get_v2_model_runner_unsupported_features", "compute_hash")}
    assert config._get_v2_model_runner_unsupported_features() == \
        unwrapped["_get_v2_model_runner_unsupported_features"](config)
    assert config.compute_hash() == unwrapped["compute_hash"](config)


def test_a_steering_engine_reports_steering_as_unsupported_by_model_runner_v2(VllmConfig):
    features = VllmConfig(additional_config=SETTINGS)._get_v2_model_runner_unsupported_features()
    assert any("sae-steer" in f for f in features)


def test_the_compile_cache_key_covers_the_plugin_code(VllmConfig, monkeypatch):
    from sae_steer.vllm_plugin import engine_config
    config = VllmConfig(additional_config=SETTINGS)
    key = config.compute_hash()
    assert key != VllmConfig.compute_hash.__wrapped__(config)
    engine_config.plugin_code_hash.cache_clear()
    monkeypatch.setattr(engine_config, "_SOURCES", engine_config._SOURCES + ("vllm_plugin/facts.py",))
    try:
        assert config.compute_hash() != key, "other plugin code must give another key"
    finally:
        engine_config.plugin_code_hash.cache_clear()


@pytest.mark.parametrize("asked,expected", [(None, None), ("PIECEWISE", "PIECEWISE"), ("NONE", "NONE"),
                                            ("FULL", "FULL"), ("FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE"),
                                            ("FULL_DECODE_ONLY", "FULL_DECODE_ONLY")])
def test_cuda_graph_choices(asked, expected):
    """Unset stays unset, for vLLM's post-init to pick its own default (FULL_AND_PIECEWISE), as for an engine
    without the plugin; an explicit mode is kept; the op becomes a split point of piecewise graphs unless the
    mode has full graphs (the graph-safe table is captured inside the pieces too)."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
    from sae_steer.vllm_plugin.engine_config import STEERING_OP, choose_graph_settings
    from sae_steer.vllm_plugin.engine_options import full_graphs
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                           cudagraph_mode=None if asked is None else CUDAGraphMode[asked])
    choose_graph_settings(cc, cuda=True, before_post_init=True)
    cc.splitting_ops = ["vllm::unified_attention"]  # what vLLM's post-init sets by default
    choose_graph_settings(cc, cuda=True, before_post_init=False)
    assert cc.cudagraph_mode == (None if expected is None else CUDAGraphMode[expected])
    graph_safe = expected is not None and expected.startswith("FULL")
    assert cc.splitting_ops == ["vllm::unified_attention"] + ([] if graph_safe else [STEERING_OP])
    assert full_graphs(cc) == graph_safe


def test_a_steering_engine_gets_vllms_default_graph_mode(VllmConfig):
    """Through the wrapped post-init: a steering engine ends with the cudagraph mode vLLM gives an engine
    without the plugin's settings (on CUDA, its default FULL_AND_PIECEWISE), nothing forced."""
    from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG, OptimizationLevel
    plain, steering = VllmConfig(), VllmConfig(additional_config=SETTINGS)
    assert steering.compilation_config.cudagraph_mode == plain.compilation_config.cudagraph_mode
    default = OPTIMIZATION_LEVEL_TO_CONFIG[OptimizationLevel.O2]["compilation_config"]["cudagraph_mode"]
    assert default.name == "FULL_AND_PIECEWISE", "vLLM's default moved: check the README and engine_config.py"


def test_no_cuda_no_graph_mode_is_chosen():
    from vllm.config import CompilationConfig
    from sae_steer.vllm_plugin.engine_config import choose_graph_settings
    cc = CompilationConfig()
    choose_graph_settings(cc, cuda=False, before_post_init=True)
    assert cc.cudagraph_mode is None


def test_a_missing_vllm_internal_disables_the_plugin_and_refuses_steering(monkeypatch):
    """A vLLM where a wrapped internal moved: register() logs and goes on; an engine with settings refuses."""
    plugin = importlib.import_module("sae_steer.vllm_plugin")
    from sae_steer.vllm_plugin import engine_config, wiring
    monkeypatch.setattr(wiring, "missing_pieces", [])

    def moved():
        raise LookupError("vllm.config.VllmConfig._get_v2_model_runner_unsupported_features")

    monkeypatch.setattr(engine_config, "install", moved)
    plugin.register()  # does not raise: vLLM still starts
    assert wiring.missing_pieces and "_get_v2_model_runner_unsupported_features" in wiring.missing_pieces[0]
    with pytest.raises(RuntimeError, match="_get_v2_model_runner_unsupported_features"):
        wiring.require_complete()
