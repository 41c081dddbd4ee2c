"""Feature metadata: decoder norms, label files (the logit lens: test_feature_lens.py, test_logit_bias.py)."""
from __future__ import annotations

import json

import pytest
import torch

from sae_steer.features import decoder_norms, load_labels
from sae_steer.tiny_model import random_sae

D = 8


def test_decoder_norms():
    sae = random_sae(D, 12, 1, "relu")
    sae.W_dec[3] *= 4
    norms = decoder_norms(sae)
    assert norms.shape == (12,)
    torch.testing.assert_close(norms[3], torch.tensor(4.0))  # random_sae rows are unit norm


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
