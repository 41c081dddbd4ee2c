"""The pieces of sae_steer.capture that the offline capture and the HTTP capture route share, without an
engine: which texts are captured and how far, reading what a worker recorded (or saying what it did not),
and the shard writer's folder (engine-level tests: tests/engine/test_capture.py, tests/server/test_http.py)."""
from __future__ import annotations

import json

import pytest
import torch

from sae_steer.capture import CaptureMissing, ShardWriter, capture_request, read_capture, tokenize_texts
from sae_steer.vllm_plugin import observers


def test_texts_are_cut_below_the_context_and_lone_tokens_left_out():
    def tokenizer(text):  # one token per character, as the model's tokenizer would give ids
        return {"input_ids": [ord(c) for c in text]}

    texts = ["abcdefgh", "x", "", "hello"]
    assert tokenize_texts(tokenizer, texts, 6, 0) == (6, [(0, [97, 98, 99, 100, 101, 102]),
                                                          (3, [104, 101, 108, 108, 111])])  # 0: context unknown
    # the context leaves room for the one sampled token; indices stay those of `texts`
    assert tokenize_texts(tokenizer, texts, 6, 5) == (4, [(0, [97, 98, 99, 100]), (3, [104, 101, 108, 108])])


def test_a_capture_is_read_from_its_chunks_and_missing_layers_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(observers.RUNTIME_DIR_ENV, str(tmp_path / "run"))
    cid, prompt, params = capture_request([5, 6, 7, 8], [1, 2])
    assert prompt == {"prompt_token_ids": [5, 6, 7, 8], "cache_salt": cid}  # no prefix-cache hit: every position runs
    assert params.max_tokens == 1 and params.extra_args[observers.CAPTURE_KEY] == {
        "id": cid, "layers": [1, 2], "positions": "all"}
    x = torch.randn(4, 3)
    for layer in (1, 2):  # two prefill chunks per layer
        observers.record_capture_positions(cid, layer, torch.tensor([0, 1]), x[:2])
        observers.record_capture_positions(cid, layer, torch.tensor([2, 3]), x[2:])
    got = read_capture(cid, [1, 2], "texts[0]", 4)
    assert torch.equal(got[1], x) and torch.equal(got[2], x)
    with pytest.raises(CaptureMissing, match=r"texts\[3\] at layers \[0\]"):
        read_capture(cid, [0, 1], "texts[3]", 4)  # layer 0 was not recorded
    with pytest.raises(CaptureMissing, match=r"texts\[3\] at layers \[1, 2\]"):
        read_capture(cid, [1, 2], "texts[3]", 5)  # position 4 never arrived
    observers.discard(cid)
    assert not list((tmp_path / "run").iterdir())
    # a CAA build's capture: the last prompt position only
    cid, _, params = capture_request([5, 6, 7], [2], positions="last")
    assert params.extra_args[observers.CAPTURE_KEY]["positions"] == "last"
    observers.record_capture(cid, 2, x[3])
    assert torch.equal(read_capture(cid, [2], "pairs[0].negative", 3, "last")[2], x[3])
    with pytest.raises(CaptureMissing, match=r"pairs\[0\].negative at layers \[1\]"):
        read_capture(cid, [1, 2], "pairs[0].negative", 3, "last")
    observers.discard(cid)
    assert not list((tmp_path / "run").iterdir())


def test_the_shard_writer_folder_has_a_manifest_only_when_complete(tmp_path):
    out = tmp_path / "capture"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an earlier capture being overwritten
    writer = ShardWriter(out, [1], shard_tokens=3, dtype=torch.float16)
    assert not (out / "manifest.json").exists()
    writer.add({1: torch.randn(4, 8)}, [1, 2, 3, 4], doc=0)
    writer.add({1: torch.randn(2, 8)}, [5, 6], doc=2)
    assert not (out / "manifest.json").exists()
    manifest = writer.close(n_texts=2, max_tokens_per_text=4, model="m", seconds=0.04)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["d_model"] == 8 and manifest["n_tokens"] == 6 and manifest["dtype"] == "float16"
    assert [s["tokens"] for s in manifest["shards"]] == [3, 3]
