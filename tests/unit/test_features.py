"""Feature label files (the logit lens: test_feature_lens.py, test_logit_bias.py; decoder norms: the feature
route's tests)."""
from __future__ import annotations

import json

import pytest

from sae_steer.features import load_labels


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
