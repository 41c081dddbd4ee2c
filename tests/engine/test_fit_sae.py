"""`fit_sae` end to end on the tiny model: capture through the engine, training that lowers the
reconstruction error, a SAELens folder that loads, and a fitted feature that steers the engine exactly
as a Hugging Face hook doing the reference math."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sae_steer.corpus import local_corpus
from sae_steer.fit_sae import FitConfig, fit_sae
from sae_steer.formats import load_sae
from tests.engine.conftest import close, first_logprobs, make_llm, prompt, run
from tests.reference import hf_greedy

pytestmark = pytest.mark.engine
LAYER = 2


@pytest.fixture(scope="module")
def fitted(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "sae"
    train, held = local_corpus()
    cfg = FitConfig(features=256, k=16, epochs=8, batch=128, lr=3e-3, aux_k=32, dead_after=4096)
    metrics = fit_sae(str(artifacts.model), LAYER, out, tokens=6000, cfg=cfg, max_tokens_per_text=128,
                      eval_texts=4, texts=(train[:80], held[:4]), dtype="float32", progress=False)
    return out, metrics


def test_fit_reduces_reconstruction_error_and_reports_quality(fitted):
    out, metrics = fitted
    assert metrics["train_tokens"] == 6000
    assert metrics["mse_final"] < 0.7 * metrics["mse_init"], (metrics["mse_final"], metrics["mse_init"])
    assert 0 < metrics["fve"] <= 1 and 0 < metrics["l0"] <= 16
    assert 0 <= metrics["dead_fraction"] <= 1
    assert metrics["ce_clean"] > 0 and metrics["ce_sae"] > 0
    assert json.loads((out / "metrics.json").read_text())["fve"] == metrics["fve"]


def test_fitted_sae_loads_and_steers_like_the_reference(artifacts, fitted):
    out, _ = fitted
    sae = load_sae(out)
    assert (sae.architecture, sae.layer, sae.k, sae.d_sae) == ("topk", LAYER, 16, 256)
    steering = {"interventions": [{"type": "sae", "sae": "fit", "feature": 5, "mode": "add", "strength": 30.0}]}
    ids = prompt(3, 14)
    llm = make_llm(artifacts, "eager", settings={"saes": {"fit": str(out)}, "layers": [LAYER]})
    try:
        plain, steered = run(llm, [ids, ids], [None, steering])
    finally:
        close(llm)
    ref = SimpleNamespace(model=artifacts.model, saes={"fit": out}, vectors={})
    ref_tokens, ref_first = hf_greedy(ref, ids, steering, len(steered.token_ids))
    assert list(steered.token_ids) == ref_tokens
    assert steered.token_ids != plain.token_ids
    for tok, lp in first_logprobs(steered).items():
        assert abs(lp - float(ref_first[tok])) < 2e-3


def test_fit_writes_feature_records_for_every_feature(fitted):
    """The records the feature and search routes serve: one per feature, with contexts from the capture, a
    logit lens and a label."""
    from sae_steer.feature_records import FeatureRecords
    out, _ = fitted
    records = FeatureRecords.load(out)
    assert len(records) == 256
    live = [r for r in records.records if r["contexts"]]
    assert len(live) > 128, "most features fired somewhere in the capture"
    for r in live:
        assert r["logit_lens"]["top"] and isinstance(r["label"], str)
        assert all(c["activation"] > 0 and 0 <= c["at"] < len(c["tokens"]) for c in r["contexts"])
