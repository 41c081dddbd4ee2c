"""The HTTP extension against a real server: the official `openai` client, streaming, n > 1,
concurrency, telemetry, compare, bad input (400 naming the field), CAA vectors built over HTTP,
admin keys, the OpenAPI schema."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.engine.conftest import close, make_llm
from tests.server.conftest import ADMIN_KEY

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]
MAX_TOKENS = 12


def sae(name, feature, mode, **kw):
    return {"type": "sae", "sae": name, "feature": feature, "mode": mode, **kw}


STEERINGS = {
    "none": None,
    "caa": {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}]},
    "relu-add": {"interventions": [sae("relu-l1", 3, "add", strength=12.0)]},
    "jump-clamp": {"interventions": [sae("jump-l2", 5, "clamp", value=9.0)], "positions": "generated"},
    "topk": {"interventions": [sae("topk-l3", f, "clamp", value=4.0) for f in range(0, 64, 8)]},
    "mixed": {"interventions": [sae("gated-l1", 7, "scale", factor=5.0), {"type": "vector", "vector": "early",
                                                                            "coef": -3.0}]},
}
PROMPTS = ["The licensee shall", "Permission is hereby granted, free of charge,", "You may not copy",
           "This program is distributed"]
CHAT = [{"role": "user", "content": "Tell me about the license."}]


@pytest.fixture(scope="module")
def offline(artifacts):
    """The offline engine's results for the same requests (in this process, then closed)."""
    from vllm import SamplingParams
    llm = make_llm(artifacts, "eager")
    try:
        def params(s):
            return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                  extra_args=None if s is None else {"steering": s})
        text = {}
        for name, s in STEERINGS.items():
            outs = llm.generate(PROMPTS, [params(s)] * len(PROMPTS), use_tqdm=False)
            text[name] = [list(o.outputs[0].token_ids) for o in outs]
        chat = {name: list(llm.chat(CHAT, params(s), use_tqdm=False)[0].outputs[0].token_ids)
                for name, s in STEERINGS.items()}
    finally:
        close(llm)
    return {"text": text, "chat": chat}


def complete(client, prompt, steering, stream=False, n=1, **extra):
    """Greedy for n=1; n>1 samples (vLLM refuses greedy n>1) with a fixed seed, so it is repeatable."""
    body = {"return_token_ids": True, "ignore_eos": True, **extra}
    if steering is not None:
        body["steering"] = steering
    sampling = dict(temperature=0.0) if n == 1 else dict(temperature=1.0, seed=1234)
    kwargs = dict(model=client.models.list().data[0].id, prompt=prompt, max_tokens=MAX_TOKENS, n=n,
                  extra_body=body, **sampling)
    if not stream:
        return [list(c.token_ids) for c in client.completions.create(**kwargs).choices]
    tokens = [[] for _ in range(n)]
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            tokens[c.index] += list(c.token_ids or [])
    return tokens


def chat(client, steering, stream=False):
    body = {"return_token_ids": True, "ignore_eos": True}
    if steering is not None:
        body["steering"] = steering
    kwargs = dict(model=client.models.list().data[0].id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0,
                  extra_body=body)
    if not stream:
        return list(client.chat.completions.create(**kwargs).choices[0].token_ids)
    tokens = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            tokens += list(getattr(c, "token_ids", None) or [])
    return tokens


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_client_equals_offline_engine(client, offline, stream):
    for name, s in STEERINGS.items():
        for i, p in enumerate(PROMPTS[:2]):
            assert complete(client, p, s, stream=stream) == [offline["text"][name][i]], (name, p)
        assert chat(client, s, stream=stream) == offline["chat"][name], name
    assert offline["text"]["caa"] != offline["text"]["none"] and offline["chat"]["caa"] != offline["chat"]["none"]


def test_sixteen_concurrent_mixed_requests_equal_their_solo_results(client, offline):
    names = list(STEERINGS)
    jobs = [(PROMPTS[i % 4], names[i % len(names)], i % 3 == 1, 2 if i % 5 == 0 else 1) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda j: complete(client, j[0], STEERINGS[j[1]], stream=j[2], n=j[3]), jobs))
    for (p, name, _stream, n), got in zip(jobs, results):
        solo = complete(client, p, STEERINGS[name], n=n)
        assert got == solo, (p, name, n)
        if n == 1:
            assert solo == [offline["text"][name][PROMPTS.index(p)]]


BAD = [
    ({"steering": {"interventions": [sae("relu-l1", 9999, "add", strength=1.0)]}}, "steering.interventions[0].feature"),
    ({"steering": {"interventions": [sae("nope", 1, "ablate")]}}, "steering.interventions[0].sae"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "add")]}}, "steering.interventions[0]"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "boost")]}}, "steering.interventions[0].mode"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "add", strength=1e12)]}}, "steering.interventions[0].strength"),
    ({"steering": {"interventions": [sae("relu-l1", -2, "ablate")]}}, "steering.interventions[0].feature"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "ablate", when={"feature": 5000})]}},
     "steering.interventions[0].when.feature"),
    ({"steering": {"interventions": [{"type": "vector", "vector": "angry"}]}}, "steering.interventions[0].vector"),
    ({"steering": {"interventions": [{"type": "vector", "layer": 2, "values": [0.0] * 3}]}},
     "steering.interventions[0].values"),
    ({"steering": {"interventions": [{"type": "vector", "layer": 9, "values": [0.0] * 128}]}},
     "steering.interventions[0].layer"),
    ({"steering": {"interventions": [{"type": "vector", "vector": "calm", "layer": 3}]}},
     "steering.interventions[0].layer"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "ablate")] * 65}}, "steering.interventions"),
    ({"steering": {"interventions": []}}, "steering.interventions"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "ablate")], "positions": "middle"}}, "steering.positions"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "ablate")], "extra": 1}}, "steering.extra"),
    ({"steering": "calm"}, "steering"),
    ({"telemetry": {"sae": "nope"}}, "telemetry.sae"),
    ({"telemetry": {"sae": "relu-l1", "top_k": 0}}, "telemetry.top_k"),
    ({"telemetry": {"sae": "relu-l1", "top_k": 3}, "n": 2}, "telemetry"),
    ({"compare": True}, "compare"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "ablate")], "telemetry": {"sae": "nope"}}},
     "steering.telemetry.sae"),
    ({"steering": {"telemetry": {"sae": "relu-l1"}, "compare": True}}, "steering.compare"),
    ({"steering": {"interventions": [sae("relu-l1", 1, "ablate")], "compare": "yes"}}, "steering.compare"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(server, body, field):
    for path, base in (("/v1/completions", {"prompt": "hello"}),
                       ("/v1/chat/completions", {"messages": CHAT})):
        r = requests.post(server.url + path, json={"model": "tiny", "max_tokens": 2, **base, **body}, timeout=60)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == field and err["message"].startswith(field), (path, err)
        assert err["code"] == 400 and err["type"] == "BadRequestError"


def test_server_keeps_serving_and_logs_no_5xx(server, client, offline):
    requests.post(server.url + "/v1/completions", data=b"{not json", timeout=30,
                  headers={"content-type": "application/json"})
    assert complete(client, PROMPTS[0], STEERINGS["caa"]) == [offline["text"]["caa"][0]]
    log = server.log.read_text()
    assert '" 500' not in log and "Traceback" not in log, log[-3000:]


def test_compare_returns_both_completions_with_one_seed(server, offline):
    r = requests.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True, "steering": STEERINGS["relu-add"], "compare": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["token_ids"] == offline["text"]["relu-add"][0]
    assert body["unsteered"]["choices"][0]["token_ids"] == offline["text"]["none"][0]
    sampled = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 123,
        "steering": STEERINGS["caa"], "compare": True}).json()
    again = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 123}).json()
    assert sampled["unsteered"]["choices"][0]["message"] == again["choices"][0]["message"], "same seed, same sample"


def test_telemetry_and_compare_inside_the_steering_object(server, offline):
    """DESIGN.md's shape: `telemetry` (and `compare`) inside `steering`."""
    r = requests.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True,
        "steering": {**STEERINGS["relu-add"], "telemetry": {"sae": "relu-l1", "top_k": 3}, "compare": True}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == offline["text"]["relu-add"][0]
    assert sorted(t["token_index"] for t in choice["telemetry"]) == list(range(MAX_TOKENS))
    assert r.json()["unsteered"]["choices"][0]["token_ids"] == offline["text"]["none"][0]
    alone = requests.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True, "steering": {"telemetry": {"sae": "relu-l1", "top_k": 3}}}).json()
    assert alone["choices"][0]["token_ids"] == offline["text"]["none"][0][:4], "telemetry alone: unsteered"
    assert len(alone["choices"][0]["telemetry"]) == 4


def test_compare_streams_the_steered_text_then_the_unsteered_one(client, offline):
    stream = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True,
                    "steering": {**STEERINGS["mixed"], "compare": True}})
    tokens, unsteered = [], None
    for chunk in stream:
        for c in chunk.choices:
            tokens += list(c.token_ids or [])
        if chunk.model_extra.get("unsteered"):
            unsteered = chunk.model_extra["unsteered"]
    assert tokens == offline["text"]["mixed"][1]
    assert unsteered["choices"][0]["token_ids"] == offline["text"]["none"][1]


def test_openai_client_sees_unsteered_and_telemetry(client, offline):
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True, "steering": {
            **STEERINGS["caa"], "telemetry": {"sae": "jump-l2", "top_k": 2}, "compare": True}})
    assert list(r.choices[0].token_ids) == offline["chat"]["caa"]
    assert r.model_extra["unsteered"]["choices"][0]["token_ids"] == offline["chat"]["none"]
    assert len(r.choices[0].model_extra["telemetry"]) == MAX_TOKENS


def hf_residual(artifacts, ids: list[int], layer: int) -> torch.Tensor:
    """[T, d]: Hugging Face's residual stream after decoder layer `layer` (hidden_states[layer + 1])."""
    from tests.reference import _hf_model
    model = _hf_model(str(artifacts.model))
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_telemetry_reports_the_top_features_of_each_generated_token(server, artifacts, stream):
    from sae_steer.formats import load_sae
    r = requests.post(server.url + "/v1/completions", timeout=60, stream=stream, json={
        "model": "tiny", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True, "stream": stream, "telemetry": {"sae": "jump-l2", "top_k": 4}})
    assert r.status_code == 200, r.text
    if stream:
        telemetry, generated = [], []
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                telemetry += choice.get("telemetry", [])
                generated += choice.get("token_ids") or []
        prompt_ids = None
    else:
        choice = r.json()["choices"][0]
        telemetry, generated, prompt_ids = choice["telemetry"], choice["token_ids"], choice["prompt_token_ids"]
    assert sorted(t["token_index"] for t in telemetry) == list(range(6))
    from transformers import AutoTokenizer
    prompt_ids = prompt_ids or AutoTokenizer.from_pretrained(artifacts.model)(PROMPTS[1])["input_ids"]
    ids = list(prompt_ids) + list(generated)
    x = hf_residual(artifacts, ids, 2)
    f = load_sae(artifacts.saes["jump-l2"]).encode(x)  # [T, d_sae]
    for t in telemetry:
        ref = f[len(prompt_ids) - 1 + t["token_index"]]
        top = ref.topk(4)
        expected = [(int(i), float(v)) for v, i in zip(top.values, top.indices) if v > 0]
        got = [(e["index"], e["activation"]) for e in t["features"]]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert all(abs(a - b) < 1e-3 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, expected))


def test_activation_capture_over_http_equals_hugging_face(server, artifacts):
    """POST /v1/steering/captures: every prompt position's stream at layers 1 and 2, in shards on the server's disk
    (sae_steer.capture's layout), equal to Hugging Face's hidden states; bad bodies name their field."""
    from transformers import AutoTokenizer
    from sae_steer.capture import load_activations, load_field
    texts = ["The licensee shall not sublicense the software.", "Permission is hereby granted, free of charge",
             "x"]  # "x" is one token: skipped (no position after the first to learn from)
    headers = {"X-Steering-Admin-Key": ADMIN_KEY}
    body = {"name": "licences", "texts": texts, "layers": [2, 1]}
    r = requests.post(server.url + "/v1/steering/captures", json=body, headers=headers, timeout=300)
    assert r.status_code == 201, r.text
    out = r.json()
    tok = AutoTokenizer.from_pretrained(artifacts.model)
    ids = [tok(t)["input_ids"] for t in texts[:2]]
    assert out["layers"] == [1, 2] and out["n_texts"] == 2 and out["n_tokens"] == sum(map(len, ids))
    assert out["dtype"] == "bfloat16"  # as `sae-steer capture` stores it: float16 overflows on Gemma's stream
    docs, pos = load_field(out["path"], "doc"), load_field(out["path"], "pos")
    for layer in (1, 2):
        acts = load_activations(out["path"], layer)
        for doc, doc_ids in enumerate(ids):
            want = hf_residual(artifacts, doc_ids, layer)
            got = acts[docs == doc][pos[docs == doc].argsort()]
            # stored in bfloat16: within half a unit in the last place (2^-8 of the value) of the fp32 stream,
            # plus the engine's own distance to Hugging Face (~1e-4 here) on values near zero
            torch.testing.assert_close(got, want, rtol=2 ** -8, atol=5e-4)
    assert requests.post(server.url + "/v1/steering/captures", json=body, headers=headers,
                         timeout=60).status_code == 409
    assert requests.post(server.url + "/v1/steering/captures", json=body, timeout=60).status_code == 401
    for bad, field in (({"texts": []}, "texts"), ({"layers": [7]}, "layers"), ({"name": "../x"}, "name"),
                       ({"texts": ["a" * 9000]}, "texts[0]")):
        r = requests.post(server.url + "/v1/steering/captures", json={**body, "name": "other", **bad},
                          headers=headers, timeout=60)
        assert r.status_code == 400 and field in json.dumps(r.json()), (bad, r.text)


def test_caa_vector_built_over_http_equals_the_hugging_face_mean_difference(server, artifacts, client):
    pairs = [{"positive": "The licensee shall keep", "negative": "The licensee shall not keep"},
             {"positive": "You may copy the software", "negative": "You may not copy the software"},
             {"positive": "Permission is granted", "negative": "Permission is denied"}]
    headers = {"X-Steering-Admin-Key": ADMIN_KEY}
    r = requests.post(server.url + "/v1/steering/vectors", json={"name": "granted", "pairs": pairs, "layers": [1, 2]},
                      headers=headers, timeout=120)
    assert r.status_code == 201, r.text
    from transformers import AutoTokenizer
    from sae_steer.formats import load_vector
    tok = AutoTokenizer.from_pretrained(artifacts.model)
    built = load_vector(r.json()["path"])
    for layer in (1, 2):
        diffs = [hf_residual(artifacts, tok(p["positive"])["input_ids"], layer)[-1]
                 - hf_residual(artifacts, tok(p["negative"])["input_ids"], layer)[-1] for p in pairs]
        expected = torch.stack(diffs).mean(0)
        torch.testing.assert_close(built[layer], expected, rtol=1e-4, atol=1e-3)
    listed = requests.get(server.url + "/v1/steering/vectors", timeout=30).json()["data"]
    assert {"granted", "calm"} <= {v["name"] for v in listed}
    steered = complete(client, PROMPTS[2], {"interventions": [{"type": "vector", "vector": "granted", "coef": 2.0}]})
    assert steered != complete(client, PROMPTS[2], None), "steering with the built vector changes the output"
    # Errors name the user's own fields, though the two-layer built vector reaches the engine as two inline ones.
    for ivs, field in (([{"type": "vector", "vector": "granted"}, sae("relu-l1", 999, "ablate")],
                        "steering.interventions[1].feature"),
                       ([{"type": "vector", "vector": "granted", "layer": 3}], "steering.interventions[0].layer")):
        r = requests.post(server.url + "/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "x", "max_tokens": 2, "steering": {"interventions": ivs}})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert requests.delete(server.url + "/v1/steering/vectors/granted", headers=headers, timeout=30).status_code == 200
    r = requests.post(server.url + "/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": "x", "max_tokens": 2,
        "steering": {"interventions": [{"type": "vector", "vector": "granted"}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.interventions[0].vector"


def test_admin_routes_need_the_key(server):
    body = {"name": "v", "pairs": [{"positive": "a", "negative": "b"}], "layers": [2]}
    assert requests.post(server.url + "/v1/steering/vectors", json=body, timeout=30).status_code == 401
    assert requests.post(server.url + "/v1/steering/vectors", json=body, timeout=30,
                         headers={"X-Steering-Admin-Key": "wrong"}).status_code == 401
    assert requests.delete(server.url + "/v1/steering/vectors/calm", timeout=30).status_code == 401
    assert requests.delete(server.url + "/v1/steering/vectors/calm", timeout=30,
                           headers={"X-Steering-Admin-Key": ADMIN_KEY}).status_code == 409  # from the config


def test_feature_route_and_sae_listing(server, artifacts):
    saes = requests.get(server.url + "/v1/steering/saes", timeout=30).json()["data"]
    assert {s["name"]: s["layer"] for s in saes} == {"relu-l1": 1, "gated-l1": 1, "jump-l2": 2, "topk-l3": 3}
    r = requests.get(server.url + "/v1/steering/saes/relu-l1/features/3?top_k=5", timeout=60).json()
    from safetensors.torch import load_file
    from sae_steer.formats import load_sae
    w = load_file(str(artifacts.model / "model.safetensors"))
    d = load_sae(artifacts.saes["relu-l1"]).W_dec[3]
    logits = w["lm_head.weight"] @ (w["model.norm.weight"] * d)  # the logit lens: W_U (g * W_dec[3])
    assert [t["token_id"] for t in r["top_tokens"]] == logits.topk(5).indices.tolist()
    assert [t["logit"] for t in r["top_tokens"]] == pytest.approx(logits.topk(5).values.tolist(), rel=1e-4, abs=1e-5)
    assert [t["token_id"] for t in r["bottom_tokens"]] == logits.topk(5, largest=False).indices.tolist()
    assert abs(r["decoder_norm"] - float(d.norm())) < 1e-5
    assert r["label"] == "the third feature"
    assert requests.get(server.url + "/v1/steering/saes/relu-l1/features/4", timeout=30).json()["label"] is None
    assert requests.get(server.url + "/v1/steering/saes/relu-l1/features/256", timeout=30).status_code == 404


def test_feature_records_are_served_and_searchable(server):
    """An SAE with features.jsonl beside it (what fit-sae writes): contexts, frequency and the automatic label
    come with the feature route, and the search route finds features by a word of their contexts or lens."""
    from tests.server.conftest import feature_record
    r = requests.get(server.url + "/v1/steering/saes/gated-l1/features/5", timeout=60).json()
    want = feature_record(5)
    assert r["contexts"] == want["contexts"] and r["frequency"] == want["frequency"]
    assert r["auto_label"] == r["label"] == "label 5" and r["direct_effect"] == want["logit_lens"]
    found = requests.get(server.url + "/v1/steering/saes/gated-l1/features?search=Winter", timeout=60).json()
    assert [(f["index"], f["score"]) for f in found["data"]] == [(5, 3), (9, 2)]  # fires on it > writes it
    assert requests.get(server.url + "/v1/steering/saes/gated-l1/features?search=volcano",
                        timeout=30).json()["data"] == []
    for query, field in (("search=cold%20winter", "search"), ("search=", "search"), ("search=x&limit=0", "limit")):
        bad = requests.get(server.url + f"/v1/steering/saes/gated-l1/features?{query}", timeout=30)
        assert bad.status_code == 400 and field in json.dumps(bad.json()), (query, bad.text)
    none = requests.get(server.url + "/v1/steering/saes/relu-l1/features?search=winter", timeout=30)
    assert none.status_code == 404 and "no feature records" in none.text
    assert "contexts" not in requests.get(server.url + "/v1/steering/saes/relu-l1/features/5", timeout=30).json()


def test_openapi_documents_the_extension(server):
    spec = requests.get(server.url + "/openapi.json", timeout=30).json()
    for path in ("/v1/steering/saes", "/v1/steering/saes/{name}/features/{index}",
                 "/v1/steering/saes/{name}/features", "/v1/steering/vectors",
                 "/v1/steering/vectors/{name}"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert {"steering", "telemetry", "compare"} <= set(schemas["SteeredCompletionRequest"]["properties"])
    assert {"steering", "telemetry", "compare"} <= set(schemas["SteeredChatCompletionRequest"]["properties"])
