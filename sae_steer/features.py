"""Feature labels for people choosing what to steer.

A pure function over files; the HTTP layer decides how to expose them. A feature's logit
lens (its decoder direction through the final norm and unembedding) has one home, with logit
steering: `vllm_plugin.logit_bias.LogitHead.logit_lens`.

Labels: a Neuronpedia-style export, either a list of {"index": ..., "description": ...} (Neuronpedia's
explanation exports; index may be a numeric string; the first description of an index wins) or
a plain object {"12": "description", ...}.
"""
from __future__ import annotations

import json
from pathlib import Path


def load_labels(path: str | Path, d_sae: int | None = None) -> dict[int, str]:
    """{feature index: description} from a label file; indices checked against d_sae when given."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"label file {str(path)!r} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"label file {str(path)!r} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list) and all(isinstance(e, dict) for e in data):
        pairs = [(e.get("index"), e.get("description")) for e in data]
    else:
        raise ValueError(f"label file {str(path)!r} must hold a list of {{index, description}} or an object "
                         f"index -> description")
    labels: dict[int, str] = {}
    for index, description in pairs:
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise ValueError(f"label file {str(path)!r}: index {index!r} is not an integer") from None
        if not isinstance(description, str):
            raise ValueError(f"label file {str(path)!r}: feature {i} has no string description")
        if i < 0 or (d_sae is not None and i >= d_sae):
            raise ValueError(f"label file {str(path)!r}: feature {i} is out of range (d_sae={d_sae})")
        labels.setdefault(i, description)
    return labels
