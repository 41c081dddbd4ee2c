"""Feature records on the tiny Llama's tokenizer and unembedding, with an SAE and activations built so that
each feature's top contexts and logit-lens tokens are known by construction."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_steer.feature_records import (FeatureRecords, build_feature_records, records_from_capture,
                                       save_feature_records)
from sae_steer.sae import SparseAutoencoder
from sae_steer.vllm_plugin.adapters import family_of
from sae_steer.vllm_plugin.logit_bias import head_of_hf

D, F, N = 128, 16, 400


@pytest.fixture(scope="module")
def model(artifacts):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(str(artifacts.model), dtype=torch.float32),
            AutoTokenizer.from_pretrained(str(artifacts.model)))


def single_token_words(tokenizer, n):
    found = []
    for w in ["license", "software", "program", "copyright", "free", "work", "source", "code", "public", "terms"]:
        ids = tokenizer.encode(" " + w, add_special_tokens=False)
        if len(ids) == 1:
            found.append((w, ids[0]))
    assert len(found) >= n, found
    return found[:n]


def test_records_know_their_contexts_logit_lens_labels_and_search(model, tmp_path):
    hf, tokenizer = model
    (w_a, tok_a), (w_b, tok_b) = single_token_words(tokenizer, 2)
    W_U = hf.lm_head.weight.detach()
    # f_i = relu(x_i): feature i reads dimension i; its decoder row is free to choose
    W_dec = torch.randn(F, D, generator=torch.Generator().manual_seed(0))
    W_dec[7] = W_U[tok_b]  # feature 7 writes token b's unembedding: b is its top logit-lens token
    sae = SparseAutoencoder(architecture="relu", W_enc=torch.eye(D)[:, :F].contiguous(), b_enc=torch.zeros(F),
                            W_dec=W_dec, b_dec=torch.zeros(D), layer=1)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 500, (N,), generator=g)
    tokens[tokens == tok_a] = 6
    docs = torch.arange(N) // 50  # documents of 50 tokens
    x = -torch.rand(N, D, generator=g)  # every feature off ...
    planted = {100: 5.0, 37: 4.0, 250: 3.0, 398: 2.0}  # ... except feature 3 at these positions
    space = tokenizer.encode(" and", add_special_tokens=False)[0]  # a word of its own: w_a is not merged on
    for p, a in planted.items():
        x[p, 3] = a
        tokens[p], tokens[p + 1] = tok_a, space
    x[200, 9] = 1.5  # feature 9 fires once, at the first token of a document
    tokens[300], tokens[301] = tok_b, space  # w_b is a whole word of the corpus: labels may name it

    records = build_feature_records(sae, [x[:123], x[123:]], tokens, tokenizer, head_of_hf(hf, family_of(["LlamaForCausalLM"])),
                                    doc_ids=docs, top_n=3, context=4, after=2, chunk=7)
    assert len(records) == F and [r["index"] for r in records] == list(range(F))
    r3 = records[3]
    assert [c["activation"] for c in r3["contexts"]] == [5.0, 4.0, 3.0]  # top 3 of 4, highest first
    assert r3["frequency"] == pytest.approx(4 / N) and r3["max_activation"] == 5.0
    c = r3["contexts"][0]  # position 100 = the first token of document 2: nothing before it
    assert c["at"] == 0 and c["tokens"] == [tokenizer.decode([t]) for t in tokens[100:103].tolist()]
    c = r3["contexts"][1]  # position 37: 4 before, 2 after, inside document 0
    assert c["at"] == 4 and c["tokens"] == [tokenizer.decode([t]) for t in tokens[33:40].tolist()]
    assert records[9]["contexts"] == [{"activation": 1.5, "at": 0,
                                       "tokens": [tokenizer.decode([t]) for t in tokens[200:203].tolist()]}]
    assert records[0]["contexts"] == [] and records[0]["frequency"] == 0.0  # never active

    # logit lens: e = l / max|l|, l = W_U (g * W_dec[i]), written out
    g_norm = hf.model.norm.weight.detach()
    for i in (3, 7):
        lens = W_U @ (g_norm * W_dec[i])
        e = lens / lens.abs().max()
        top = e.topk(10)
        assert [t for t, _ in records[i]["logit_lens"]["top"]] == [tokenizer.decode([t]) for t in top.indices.tolist()]
        assert [v for _, v in records[i]["logit_lens"]["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert records[i]["logit_lens"]["bottom"][0][0] == tokenizer.decode([int(e.argmin())])
    assert records[7]["logit_lens"]["top"][0] == [tokenizer.decode([tok_b]), 1.0]

    # labels: what it fires on -> what it writes (heuristic)
    assert records[3]["label"].startswith(w_a + " -> ")
    assert records[7]["label"].startswith("? -> " + w_b)

    # stored beside the SAE, loaded, searched
    save_feature_records(records, tmp_path)
    book = FeatureRecords.load(tmp_path)
    assert len(book) == F and book.get(3) == json.loads(json.dumps(records[3]))
    with pytest.raises(IndexError):
        book.get(F)
    assert book.search(w_a.upper())[0] == {"index": 3, "label": records[3]["label"], "score": 9}
    assert book.search(w_b)[0]["index"] == 7
    assert book.search("zzzqqq") == []
    with pytest.raises(ValueError):
        book.search("two words")

    # the same records from sae_steer.capture's shard layout
    cap = tmp_path / "capture"
    cap.mkdir()
    shards = []
    for k, (lo, hi) in enumerate([(0, 150), (150, N)]):
        name = f"shard-{k:05d}.safetensors"
        save_file({"L1": x[lo:hi].half(), "tokens": tokens[lo:hi].int(), "doc": docs[lo:hi].int(),
                   "pos": (torch.arange(lo, hi) % 50 + 1).int()}, str(cap / name))  # no position 0: see below
        shards.append({"file": name, "n_tokens": hi - lo})
    (cap / "manifest.json").write_text(json.dumps({"layers": [1], "d_model": D, "dtype": "float16",
                                                   "n_tokens": N, "shards": shards}))
    again = records_from_capture(sae, cap, tokenizer, head_of_hf(hf, family_of(["LlamaForCausalLM"])),
                                 top_n=3, context=4, after=2)
    assert [c["tokens"] for c in again[3]["contexts"]] == [c["tokens"] for c in r3["contexts"]]
    assert again[7]["logit_lens"] == records[7]["logit_lens"]
    # a text's position 0 (an attention sink in real models) is read as a zero stream: planted position 37 as a
    # position 0 no longer tops feature 3
    with safe_open(str(cap / "shard-00000.safetensors"), framework="pt") as f:
        fields = {k: f.get_tensor(k) for k in f.keys()}
    fields["pos"][37] = 0
    save_file(fields, str(cap / "shard-00000.safetensors"))
    sink = records_from_capture(sae, cap, tokenizer, head_of_hf(hf, family_of(["LlamaForCausalLM"])),
                                top_n=3, context=4, after=2)
    assert [c["tokens"] for c in sink[3]["contexts"]][0] == r3["contexts"][0]["tokens"]
    assert r3["contexts"][1]["tokens"] not in [c["tokens"] for c in sink[3]["contexts"]]
