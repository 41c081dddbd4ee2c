"""Feature metadata: decoder norms, logit lens through the final norm + unembedding, label files."""
from __future__ import annotations

import json

import pytest
import torch

from sae_steer.features import LogitLens, decoder_norms, load_labels, logit_lens
from sae_steer.tiny_model import random_sae

D, V = 8, 20


def test_decoder_norms():
    sae = random_sae(D, 12, 1, "relu")
    sae.W_dec[3] *= 4
    norms = decoder_norms(sae)
    assert norms.shape == (12,)
    torch.testing.assert_close(norms[3], torch.tensor(4.0))  # random_sae rows are unit norm


def test_logit_lens_goes_through_the_final_norm():
    unembed = torch.zeros(V, D)
    unembed[4, 0] = 1.0  # token 4 reads dimension 0
    unembed[9, 1] = 1.0  # token 9 reads dimension 1
    direction = torch.tensor([1.0, 2.0] + [0.0] * (D - 2))
    weight = torch.ones(D)
    out = logit_lens(direction, weight, 1e-6, unembed, k=2)
    assert [t for t, _ in out["top"]] == [9, 4]
    weight[0] = 10.0  # the norm weight can reorder tokens: it is applied before the unembedding
    out = logit_lens(direction, weight, 1e-6, unembed, k=2)
    assert [t for t, _ in out["top"]] == [4, 9]
    rms = direction.pow(2).mean().add(1e-6).rsqrt()
    assert out["top"][0][1] == pytest.approx(10.0 * rms.item(), rel=1e-5)
    negative = logit_lens(-direction, torch.ones(D), 1e-6, unembed, k=1)
    assert negative["bottom"][0][0] == 9
    # scale-invariant up to eps: the feature's norm does not change its tokens
    assert logit_lens(direction * 50, weight, 1e-6, unembed, k=3)["top"][0][0] == 4


def test_logit_lens_cache():
    sae = random_sae(D, 12, 1, "relu")
    lens = LogitLens({"s": sae}, torch.ones(D), 1e-5, torch.randn(V, D))
    first = lens.top_tokens("s", 3, 5)
    assert lens.top_tokens("s", 3, 5) is first
    assert lens.top_tokens.cache_info().hits == 1
    assert first == logit_lens(sae.W_dec[3], torch.ones(D), 1e-5, lens.unembed, 5)
    with pytest.raises(ValueError, match="out of range"):
        lens.top_tokens("s", 12)


def test_labels_accept_neuronpedia_lists_and_plain_objects(tmp_path):
    listing = tmp_path / "np.json"
    listing.write_text(json.dumps([{"modelId": "m", "layer": "6-res", "index": "3", "description": "cats"},
                                   {"index": 7, "description": "dogs"},
                                   {"index": "3", "description": "second explanation of 3"}]))
    assert load_labels(listing, d_sae=10) == {3: "cats", 7: "dogs"}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"0": "zero", "9": "nine"}))
    assert load_labels(plain) == {0: "zero", 9: "nine"}
    for text, message in [("[1, 2]", "must hold"), ('{"x": "a"}', "not an integer"), ('{"12": "a"}', "out of range"),
                          ('{"1": 5}', "no string description"), ("{", "not valid JSON")]:
        plain.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            load_labels(plain, d_sae=10)
        assert str(plain) in str(e.value)
