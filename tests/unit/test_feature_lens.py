"""The two logit lenses of the API process, without an engine, on the served model's final norm and unembedding
read from its safetensors and config by its family's names (logit_bias.head_of_checkpoint), for every family:
- a feature's (the feature route, served here for GPT-2 and GPT-NeoX: LayerNorm, tied or separate
  unembeddings, prefixed names) == the formula written out here plainly: l = W_U (g * u), u centered first for
  LayerNorm, the norm's bias left out (it is no direction);
- a stream's (LogitHead.logits, the lens route's probabilities) == Hugging Face's own final norm and
  unembedding on its stream after each layer, and at the last layer == the model's own next-token output."""
from __future__ import annotations

import json
import operator
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_steer.formats import save_sae
from sae_steer.tiny_model import TINY_FAMILIES, random_sae
from sae_steer.vllm_plugin.logit_bias import head_of_checkpoint

D_MODEL = 64
SAE = random_sae(D_MODEL, 16, 0, "relu", seed=3)  # served as "s"

# Where each family's checkpoint keeps its final norm and unembedding, written out a second time:
# family -> (final norm weight, unembedding, the gain from the norm's weight w, LayerNorm (centers)).
PLAIN = {
    "llama": ("model.norm.weight", "lm_head.weight", lambda w: w, False),
    "mistral": ("model.norm.weight", "lm_head.weight", lambda w: w, False),
    "qwen2": ("model.norm.weight", "lm_head.weight", lambda w: w, False),
    "qwen3": ("model.norm.weight", "lm_head.weight", lambda w: w, False),
    "phi3": ("model.norm.weight", "lm_head.weight", lambda w: w, False),
    "gemma2": ("model.norm.weight", "model.embed_tokens.weight", lambda w: 1 + w, False),  # tied; scales by 1 + w
    "gemma3": ("model.norm.weight", "model.embed_tokens.weight", lambda w: 1 + w, False),
    "gpt2": ("transformer.ln_f.weight", "transformer.wte.weight", lambda w: w, True),  # tied
    "gpt_neox": ("gpt_neox.final_layer_norm.weight", "embed_out.weight", lambda w: w, True),
}
# The Hugging Face modules of each family: (decoder blocks, final norm, config key of the norms' epsilon); the
# unembedding is `lm_head` in all of them (GPT-NeoX's checkpoint calls it embed_out).
LLAMA_LIKE = ("model.layers", "model.norm", "rms_norm_eps")
HF = {**dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"), LLAMA_LIKE),
      "gpt2": ("transformer.h", "transformer.ln_f", "layer_norm_epsilon"),
      "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "layer_norm_eps")}
EPS = 0.05  # every norm's epsilon: of the order of the tiny streams' mean square, so a fixed epsilon shows
SOFTCAP = {"gemma2": 0.3, "gemma3": 0.3}  # Gemma's final logit soft-cap, tight enough to bend the tiny logits
N_LAYERS = 2


def plain_lens(model_dir, family: str, u: torch.Tensor) -> torch.Tensor:
    norm, unembed, gain, layer_norm = PLAIN[family]
    w = load_file(str(model_dir / "model.safetensors"))
    if layer_norm:
        u = u - u.mean()
    return w[unembed] @ (gain(w[norm]) * u)


def build_with_references(root: str) -> None:
    """The tiny model of every family in root/<family>, its final norm given random gains and, for LayerNorm,
    random biases (a tiny model's identity gains and zero biases would hide one left out or misapplied), every
    norm's epsilon EPS, Gemma's logits soft-capped; beside it, reference.safetensors: Hugging Face's streams
    after each layer of a prompt ("stream.L" [n, d_model]), its final norm and unembedding (and soft-cap)
    softmaxed on them ("probs.L" [n, vocab]), and the model's own output distribution ("output")."""
    from transformers import AutoModelForCausalLM

    from sae_steer.tiny_model import build_tiny_model
    g = torch.Generator().manual_seed(0)
    for family, (norm, _, _, layer_norm) in PLAIN.items():
        path = Path(root) / family
        build_tiny_model(path, family, hidden=D_MODEL, layers=N_LAYERS, heads=2, kv_heads=1, intermediate=128,
                         vocab=300)
        weights = load_file(str(path / "model.safetensors"))
        weights[norm] = torch.rand(D_MODEL, generator=g) + 0.5
        if layer_norm:
            weights[norm.removesuffix("weight") + "bias"] = torch.randn(D_MODEL, generator=g)
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        blocks, final_norm, eps_key = HF[family]
        config = json.loads((path / "config.json").read_text())
        config[eps_key] = EPS
        if family in SOFTCAP:
            config["final_logit_softcapping"] = SOFTCAP[family]
        (path / "config.json").write_text(json.dumps(config))

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.randint(2, model.config.vocab_size, (1, 10), generator=g)
        streams = {}

        def keep(L):
            return lambda module, args, out: streams.__setitem__(L, (out[0] if isinstance(out, tuple) else out)[0])

        for L, block in enumerate(operator.attrgetter(blocks)(model)):
            block.register_forward_hook(keep(L))
        with torch.no_grad():
            reference = {"output": model(ids).logits[0].softmax(-1)}
            for L, x in streams.items():
                logits = model.lm_head(operator.attrgetter(final_norm)(model)(x))
                if family in SOFTCAP:
                    logits = SOFTCAP[family] * torch.tanh(logits / SOFTCAP[family])
                reference |= {f"stream.{L}": x, f"probs.{L}": logits.softmax(-1)}
        save_file({k: v.contiguous() for k, v in reference.items()}, str(path / "reference.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> its tiny model folder (build_with_references). Built in a subprocess: vLLM's Transformers
    backend decorates the Hugging Face GPT-NeoX classes of a process that has run a GPT-NeoX engine."""
    root = tmp_path_factory.mktemp("heads")
    code = ("import sys; from tests.unit.test_feature_lens import build_with_references; "
            "build_with_references(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {family: root / family for family in TINY_FAMILIES}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_head_is_read_by_its_own_names(checkpoints, family):
    u = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    got = head_of_checkpoint(checkpoints[family]).logit_lens(u[None])[0]
    torch.testing.assert_close(got, plain_lens(checkpoints[family], family, u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_lens_of_a_stream_is_the_models_own_head(checkpoints, family):
    reference = load_file(str(checkpoints[family] / "reference.safetensors"))
    head = head_of_checkpoint(checkpoints[family])
    for L in range(N_LAYERS):
        got, want = head.logits(reference[f"stream.{L}"]).softmax(-1), reference[f"probs.{L}"]
        assert got.topk(3).indices.tolist() == want.topk(3).indices.tolist(), L
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the last layer's lens is the model's next-token distribution
    torch.testing.assert_close(got, reference["output"], rtol=1e-4, atol=1e-6)


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """serve(model folder) -> a client of the SAE routes of a SteeringState over that folder, with SAE "s"."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sae_steer.registry import Settings
    from sae_steer.server import saes
    from sae_steer.server.state import VECTOR_DIR_ENV, SteeringState
    from sae_steer.vllm_plugin import facts
    sae_path = save_sae(SAE, tmp_path / "sae")
    settings = Settings.from_additional_config({"sae_steer": {"saes": {"s": str(sae_path)}}})
    monkeypatch.setattr(facts, "_current", settings.model_facts(D_MODEL, 1))
    monkeypatch.setattr(facts, "_current_settings", settings)
    monkeypatch.setenv(VECTOR_DIR_ENV, str(tmp_path / "vectors"))

    def client(model_dir):
        app = FastAPI()
        app.include_router(saes.router)
        app.state.sae_steer = SteeringState(None, SimpleNamespace(model=str(model_dir)))
        return TestClient(app)

    return client


def route_lens(client, feature: int, k: int) -> dict:
    r = client.get(f"/v1/steering/saes/s/features/{feature}?top_k={k}")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_feature_route_serves_the_logit_lens_of_layernorm_families(checkpoints, serve, family, tmp_path):
    client = serve(checkpoints[family])
    u = SAE.W_dec[3]
    want = plain_lens(checkpoints[family], family, u)
    r = route_lens(client, 3, 5)
    assert [t["token_id"] for t in r["top_tokens"]] == want.topk(5).indices.tolist()
    assert [t["token_id"] for t in r["bottom_tokens"]] == want.topk(5, largest=False).indices.tolist()
    assert [t["logit"] for t in r["top_tokens"]] == pytest.approx(want.topk(5).values.tolist(), rel=1e-4, abs=1e-5)
    assert r["decoder_norm"] == pytest.approx(float(u.norm()), rel=1e-5)
    if family == "gpt2":  # GPT-2's own checkpoint is of the base model: no `transformer.` before its names
        base = tmp_path / "gpt2-base"
        shutil.copytree(checkpoints["gpt2"], base)
        weights = load_file(str(base / "model.safetensors"))
        save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, str(base / "model.safetensors"),
                  metadata={"format": "pt"})
        assert route_lens(serve(base), 3, 5)["top_tokens"] == r["top_tokens"]


@pytest.mark.parametrize("broken, named", [
    ("embed_out.weight", "`embed_out.weight` (the unembedding)"),
    ("gpt_neox.final_layer_norm.weight", "`gpt_neox.final_layer_norm.weight` (the final norm)"),
    ("architectures", "cannot steer architecture ['FooForCausalLM']"),
])
def test_a_checkpoint_without_the_family_names_answers_what_is_missing(checkpoints, serve, tmp_path, broken, named):
    model = tmp_path / "model"
    shutil.copytree(checkpoints["gpt_neox"], model)
    if broken == "architectures":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    else:
        weights = load_file(str(model / "model.safetensors"))
        del weights[broken]
        save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    client = serve(model)
    for _ in range(2):  # the answer is kept, not a traceback the second time
        r = client.get("/v1/steering/saes/s/features/3")
        assert r.status_code == 422, r.text
        assert named in r.json()["error"]["message"] and str(model) in r.json()["error"]["message"]
