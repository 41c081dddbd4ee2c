"""POST /v1/steering/lens (the route the playground's logit-lens grid draws) against Hugging Face: the stream
after each decoder layer, through the model's own final norm and unembedding, softmaxed. No browser needed."""
from __future__ import annotations

import pytest
import requests
import torch

from tests.browser.conftest import AUTH

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]
PROMPT = "The cold came in winter and the river froze"


@pytest.fixture(scope="module")
def reference(artifacts):
    """Per layer L: softmax(lm_head(norm(stream after layer L))) at every prompt position, [n, vocab]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(artifacts.model, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(artifacts.model)(PROMPT, return_tensors="pt")["input_ids"]
    streams = {}

    def keep(L):
        return lambda module, args, out: streams.__setitem__(L, out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(keep(L)) for L, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
        probs = {L: model.lm_head(model.model.norm(x))[0].softmax(-1) for L, x in streams.items()}
    for h in hooks:
        h.remove()
    return ids[0].tolist(), probs


def lens(playground, **body):
    r = requests.post(playground.url + "/v1/steering/lens", json={"prompt": PROMPT, "top_k": 3, **body},
                      headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_lens_matches_the_models_own_head_at_every_layer(playground, reference):
    ids, probs = reference
    got = lens(playground)
    assert got["token_ids"] == ids and got["layers"] == [0, 1, 2, 3] and got["steered"] is False
    for li, L in enumerate(got["layers"]):
        for pos, cell in enumerate(got["grid"][li]):
            want = probs[L][pos].topk(3)
            assert [c["token_id"] for c in cell] == want.indices.tolist(), (L, pos)
            assert [c["prob"] for c in cell] == pytest.approx(want.values.tolist(), abs=2e-3), (L, pos)


def test_steered_lens_moves_the_layers_after_the_edit(playground):
    steering = {"interventions": [{"type": "vector", "vector": "calm", "coef": 8.0}]}  # "calm" is at layer 1
    plain, steered = lens(playground), lens(playground, steering=steering)
    assert steered["steered"] is True
    top = lambda g, li: [cell[0]["token_id"] for cell in g["grid"][li]]  # noqa: E731
    for li in (0, 1):  # up to and including the edited layer, whose row is read before its own edit
        assert top(steered, li) == top(plain, li)
    assert any(top(steered, li) != top(plain, li) for li in (2, 3))


def test_lens_errors_name_their_field(playground):
    cases = [({"prompt": PROMPT, "layers": [7]}, "layers[0]"),
             ({"prompt": PROMPT, "steering": {"interventions": [{"type": "vector", "vector": "nope"}]}},
              "steering.interventions[0].vector"),
             ({"prompt": "a"}, "prompt")]
    for body, field in cases:
        r = requests.post(playground.url + "/v1/steering/lens", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
