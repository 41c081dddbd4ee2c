"""The demo's wiring (`sae_steer.demo.show`) on the tiny model: a real `sae-steer serve`, the search route
picking the concept's feature from the SAE's records, calibrated "auto" steering for the CAA vector and the
SAE feature beside the unsteered answers, and per-token telemetry with labels. (The SmolLM2 run itself is
`make demo`; its transcript is in the README.)"""
from __future__ import annotations

import json

import pytest
import torch

from sae_steer import calibration, demo
from sae_steer.formats import save_sae, save_vector
from sae_steer.tiny_model import random_sae
from tests.server.conftest import feature_record

pytestmark = pytest.mark.engine
D_MODEL, LAYER = 128, 2


@pytest.fixture(scope="module")
def shown(artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    sae_file = save_sae(random_sae(D_MODEL, 256, LAYER, "relu", seed=21), tmp / "saes" / "demo-sae")
    # the records fit-sae would write: feature 5 fires on "winter", feature 9 writes it (tests/server/conftest.py)
    sae_file.with_name(f"{sae_file.stem}.features.jsonl").write_text(
        "".join(json.dumps(feature_record(i)) + "\n" for i in range(256)))
    vector = save_vector({LAYER: torch.randn(D_MODEL, generator=torch.Generator().manual_seed(22))},
                         tmp / "vectors" / "cold.safetensors")
    calibration.save_vector_calibration(vector, LAYER, 6.0)  # what `sae-steer eval` stores
    calibration.save_feature_calibration(sae_file, 5, "add", 30.0, source={"concept": "cold"})
    lines: list[str] = []
    result = demo.show(artifacts.model, sae_file, vector, prompts=["What is the weather like?", "Tell me a story."],
                       max_tokens=8, log_dir=tmp, extra_args=["--dtype", "float32"], out=lines.append)
    return result, "\n".join(lines)


def test_the_search_route_picks_the_concepts_feature(shown):
    result, printed = shown
    assert result["feature"] == 5  # "cold" is in every context (1 point each); "winter" adds 3 to 5 and 2 to 9
    assert "feature     5" in printed and "'label 5'" in printed


def test_calibrated_answers_stand_beside_the_unsteered_one(shown):
    result, printed = shown
    caa, sae = "CAA cold vector, calibrated (coef auto)", "SAE feature 5, calibrated add (strength auto)"
    for prompt, answers in result["answers"].items():
        assert set(answers) == {"unsteered", caa, sae}, answers
        assert answers[caa] != answers["unsteered"] and answers[sae] != answers["unsteered"], answers
        assert f">>> {prompt}" in printed


def test_telemetry_lists_top_features_per_generated_token(shown):
    result, printed = shown
    assert sorted(t["token_index"] for t in result["telemetry"]) == list(range(8))
    assert all(1 <= len(t["features"]) <= 3 for t in result["telemetry"])
    assert "Top features of 'smollm2-l15' per token" in printed
