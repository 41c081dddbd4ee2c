"""Activation capture at scale (sae_steer.capture) through the engine's steering op == Hugging Face
`output_hidden_states` (hidden_states[L + 1] is the stream after decoder layer L), at every prompt
position, across chunked prefill (max_num_batched_tokens=64 splits the long texts) and shard boundaries."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_steer.capture import capture_activations, load_activations
from tests.engine.conftest import close, make_llm

pytestmark = pytest.mark.engine

LAYERS = [0, 2]  # not the last layer: HF's last hidden state is after the final norm
TEXTS = ["Permission is hereby granted, free of charge, to any person obtaining a copy.",
         "x",  # one token at most: skipped (nothing to learn from a lone position)
         "The GNU General Public License is a free, copyleft license for software and other kinds of works. " * 3,
         "Everyone is permitted to copy and distribute verbatim copies of this license document."]


@pytest.fixture(scope="module")
def captured(artifacts, mode, tmp_path_factory):
    from sae_steer.vllm_plugin import observers
    out = tmp_path_factory.mktemp(f"capture-{mode}")
    before = set(observers.check_runtime_dir().iterdir())  # the directory is shared with whatever ran before
    llm = make_llm(artifacts, mode, settings={"layers": LAYERS}, max_num_batched_tokens=64)
    try:
        manifest = capture_activations(llm, TEXTS, LAYERS, out, max_tokens_per_text=100, shard_tokens=50,
                                       dtype=torch.float32, batch_texts=3)
    finally:
        close(llm)
    return out, manifest, before


@pytest.fixture(scope="module")
def hf_reference(artifacts):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(artifacts.model)
    model = AutoModelForCausalLM.from_pretrained(artifacts.model, dtype=torch.float32)
    ref = {}
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"][:100]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        ref[i] = (ids, {L: hs[L + 1][0] for L in LAYERS})
    return ref


def test_capture_equals_hf_hidden_states(captured, hf_reference):
    out, manifest, _ = captured
    expected_tokens = sum(len(ids) for ids, _ in hf_reference.values())
    assert manifest["n_tokens"] == expected_tokens and manifest["layers"] == LAYERS
    assert max(len(ids) for ids, _ in hf_reference.values()) > 64  # a text went through chunked prefill
    shards = [load_file(str(out / s["file"])) for s in manifest["shards"]]
    assert [len(s["tokens"]) for s in shards] == [50] * (expected_tokens // 50) + \
        ([expected_tokens % 50] if expected_tokens % 50 else [])
    doc = torch.cat([s["doc"] for s in shards])
    pos = torch.cat([s["pos"] for s in shards])
    tokens = torch.cat([s["tokens"] for s in shards])
    assert sorted(set(doc.tolist())) == sorted(hf_reference)  # the one-token text was skipped
    for layer in LAYERS:
        acts = load_activations(out, layer)
        assert acts.shape == (expected_tokens, 128)
        for i, (ids, hidden) in hf_reference.items():
            rows = doc == i
            assert pos[rows].tolist() == list(range(len(ids)))
            assert tokens[rows].tolist() == ids
            ref = hidden[layer]
            err = (acts[rows] - ref).norm(dim=-1) / ref.norm(dim=-1)
            assert err.max() < 1e-4, (layer, i, err.max())
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_capture_leaves_no_files_in_the_runtime_dir(captured):
    from sae_steer.vllm_plugin import observers
    _, _, before = captured
    assert not [p for p in set(observers.runtime_dir().iterdir()) - before if p.name.startswith("cap")]
