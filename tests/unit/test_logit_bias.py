"""Logit-space feature steering without vLLM: the feature's effect through the final norm and the
unembedding, the batched per-row bias state under vLLM's add/remove/move updates, and admission."""
from __future__ import annotations

import random

import pytest
import torch

from sae_steer.spec import LogitIntervention, ModelFacts, SaeFacts, SteeringError, parse_steering
from sae_steer.vllm_plugin.logit_bias import LogitBias, LogitHead

D = 16


def plain_effect(u, W_U, gain, centered=False):
    """e = l / max|l| with l = W_U (g * u), u centered first for LayerNorm: one direction, written out."""
    if centered:
        u = u - u.mean()
    lens = torch.stack([sum(W_U[v, j] * gain[j] * u[j] for j in range(len(u))) for v in range(W_U.shape[0])])
    return lens / lens.abs().max()


@pytest.mark.parametrize("centered", [False, True])
def test_unit_effect_equals_the_plain_formula(centered):
    g = torch.Generator().manual_seed(0)
    W_U, gain, u = torch.randn(40, D, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
    head = LogitHead(W_U, gain, centered)
    got = head.unit_effects(u[None])[0]
    torch.testing.assert_close(got, plain_effect(u, W_U, gain, centered), rtol=1e-5, atol=1e-6)
    assert got.abs().max() == pytest.approx(1.0)
    # the SAE's scale does not matter, the sign does
    torch.testing.assert_close(head.unit_effects(7.5 * u[None])[0], got)
    torch.testing.assert_close(head.unit_effects(-u[None])[0], -got)
    if centered:  # LayerNorm removes the mean: a constant direction has no effect
        assert torch.equal(head.unit_effects(torch.ones(1, D))[0], torch.zeros(40))


def test_bias_sums_strengths_over_chunks_of_a_large_vocab():
    g = torch.Generator().manual_seed(1)
    W_U = torch.randn(9000, D, generator=g).to(torch.bfloat16)  # > one vocab chunk, a half-precision head
    gain = torch.rand(D, generator=g) + 0.5
    u = torch.randn(2, D, generator=g)
    bias = LogitHead(W_U, gain, False).bias(u, [4.0, -1.5])
    lens = W_U.float() @ (u * gain).T  # [vocab, 2]
    expected = 4.0 * lens[:, 0] / lens[:, 0].abs().max() - 1.5 * lens[:, 1] / lens[:, 1].abs().max()
    torch.testing.assert_close(bias, expected, rtol=1e-5, atol=1e-5)
    # strength is in logits at the most affected token
    assert LogitHead(W_U, gain, False).bias(u[:1], [4.0]).abs().max().item() == pytest.approx(4.0)


def test_batched_apply_equals_a_per_row_reference_under_random_updates():
    rows, vocab = 12, 50
    rng, g = random.Random(0), torch.Generator().manual_seed(2)
    keys = [None, "a", "b", "c", ("a", "b")]
    values = {k: torch.randn(vocab, generator=g) for k in keys if k is not None}
    computed = []

    def bias_of(key):
        computed.append(key)
        return values[key]

    state = LogitBias(rows, vocab, "cpu")
    live: dict[int, str | None] = {}  # the reference: persistent-batch row -> key, as vLLM's rows move
    batch = 0
    for step in range(300):
        # removals leave holes, adds fill them (or append), then moves condense or swap: like InputBatch
        removed = rng.sample(sorted(live), k=rng.randint(0, min(3, len(live))))
        for r in removed:
            del live[r]
        added = []
        for _ in range(rng.randint(0, 3)):
            free = [r for r in range(rows) if r not in live]
            if not free:
                break
            r, key = rng.choice(free), rng.choice(keys)
            # an added row may be one still occupied in `state` (removed this step and reused)
            live[r] = key
            added.append((r, key))
        moved = []
        for _ in range(rng.randint(0, 2)):
            a, b = rng.randrange(rows), rng.randrange(rows)
            if a == b or a not in live:
                continue
            if b in live and rng.random() < 0.5:
                live[a], live[b] = live[b], live[a]
                moved.append((a, b, True))
            else:  # one-way: b's request (if any) is replaced, a is left empty
                live[b] = live.pop(a)
                moved.append((a, b, False))
        state.update(added, removed, moved, bias_of)
        batch = max(live, default=-1) + 1
        logits = torch.randn(batch, vocab, generator=g)
        expected = logits.clone()
        for r, key in live.items():
            if key is not None:
                expected[r] = expected[r] + values[key]
        got = state.apply(logits.clone())
        assert torch.equal(got, expected), step
        assert sum(slot >= 0 for slot in state.rows.row_slot) == sum(k is not None for k in live.values())
        assert len(state.rows.live) == len({k for k in live.values() if k is not None})  # freed when unused
    # one bias row per distinct key among live requests, computed only when a key first goes live
    assert len(computed) < 300
    assert set(computed) == {k for k in keys if k is not None}


def test_unsteered_batches_are_not_touched():
    state = LogitBias(4, 8, "cpu")
    state.update([(0, None), (1, None)], [], [], lambda key: pytest.fail("no bias is needed"))
    logits = torch.full((2, 8), float("nan"))
    assert state.apply(logits) is logits and logits.isnan().all()
    state.update([(2, "k")], [], [], lambda key: torch.ones(8))
    logits = torch.zeros(3, 8)
    state.apply(logits)
    assert logits[:2].eq(0).all() and logits[2].eq(1).all()
    state.update([], [2], [], None)
    assert state.rows.row_slot == [-1] * 4 and not state.rows.live


FACTS = ModelFacts(d_model=D, num_layers=4, steerable_layers=frozenset({1}),
                   saes={"s": SaeFacts(d_sae=32, layer=1, architecture="relu", d_model=D)})


def test_admission_of_logit_interventions():
    ok = parse_steering({"interventions": [{"type": "logit", "sae": "s", "feature": 31, "strength": 4}]}, FACTS)
    assert ok.interventions[0] == LogitIntervention(type="logit", sae="s", feature=31, strength=4.0)
    bad = [({"type": "logit", "sae": "t", "feature": 1, "strength": 1.0}, "steering.interventions[0].sae"),
           ({"type": "logit", "sae": "s", "feature": 32, "strength": 1.0}, "steering.interventions[0].feature"),
           ({"type": "logit", "sae": "s", "feature": -1, "strength": 1.0}, "steering.interventions[0].feature"),
           ({"type": "logit", "sae": "s", "feature": 1, "strength": float("nan")}, "steering.interventions[0].strength"),
           ({"type": "logit", "sae": "s", "feature": 1, "strength": float("inf")}, "steering.interventions[0].strength"),
           ({"type": "logit", "sae": "s", "feature": 1, "strength": 1e9}, "steering.interventions[0].strength"),
           ({"type": "logit", "sae": "s", "feature": 1}, "steering.interventions[0].strength"),
           ({"type": "logit", "sae": "s", "feature": 1, "strength": 1.0, "mode": "add"},
            "steering.interventions[0].mode")]
    for iv, field in bad:
        with pytest.raises(SteeringError) as e:
            parse_steering({"interventions": [iv]}, FACTS)
        assert e.value.field == field, (iv, e.value)
    refusing = ModelFacts(**{**FACTS.__dict__, "logit_refusal": "needs tensor parallel size 1"})
    with pytest.raises(SteeringError, match="tensor parallel") as e:
        parse_steering({"interventions": [{"type": "logit", "sae": "s", "feature": 1, "strength": 1.0}]}, refusing)
    assert e.value.field == "steering.interventions[0].type"
