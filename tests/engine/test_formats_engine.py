"""The same SAEs and vectors saved in every upstream format steer the real engine exactly as the
native files do: one eager engine with every copy registered under its own name."""
from __future__ import annotations

from dataclasses import replace

import pytest

from sae_steer import formats
from tests.engine.conftest import close, first_logprobs, make_llm, prompt, run
from tests.format_writers import (write_dictionary_learning, write_gemmascope, write_npy_rows, write_repeng_gguf,
                                  write_saelens, write_sparsify)

pytestmark = pytest.mark.engine


def sae(name, feature, mode, **kw):
    return {"type": "sae", "sae": name, "feature": feature, "mode": mode, **kw}


# native SAE/vector name -> (the steering it gets, with {} for its name)
STEERINGS = {
    "relu-l1": lambda n: [sae(n, 3, "add", strength=12.0), sae(n, 10, "clamp", value=15.0)],
    "gated-l1": lambda n: [sae(n, f, "scale", factor=6.0) for f in range(32)],
    "jump-l2": lambda n: [sae(n, 5, "add", strength=-10.0), sae(n, 9, "clamp", value=8.0)],
    "topk-l3": lambda n: [sae(n, f, "clamp", value=4.0) for f in range(0, 64, 8)],
    "calm": lambda n: [{"type": "vector", "vector": n, "coef": 4.0}],
}


@pytest.fixture(scope="module")
def copies(artifacts, tmp_path_factory):
    """{native name: {copy name: path}} for every format that can hold that SAE / vector."""
    root = tmp_path_factory.mktemp("format-copies")
    load = {n: formats.load_sae(p) for n, p in artifacts.saes.items()}
    # Gemma Scope SAEs do not subtract b_dec: the same function with b_dec folded into b_enc.
    jump = load["jump-l2"]
    jump_gs = replace(jump, b_enc=jump.b_enc - jump.b_dec @ jump.W_enc, apply_b_dec_to_input=False)
    calm = formats.load_vector(artifacts.vectors["calm"])
    return {
        "relu-l1": {"relu-saelens": write_saelens(load["relu-l1"], root / "relu-saelens"),
                    "relu-dl": write_dictionary_learning(load["relu-l1"], root / "relu-dl")},
        "gated-l1": {"gated-saelens": write_saelens(load["gated-l1"], root / "gated-saelens"),
                     "gated-dl": write_dictionary_learning(load["gated-l1"], root / "gated-dl")},
        "jump-l2": {"jump-saelens": write_saelens(load["jump-l2"], root / "jump-saelens", old_style=True),
                    "jump-gemmascope": write_gemmascope(jump_gs, root / "gemma-scope-res")},
        "topk-l3": {"topk-sparsify": write_sparsify(load["topk-l3"], root / "sparsify-run"),
                    "topk-saelens": write_saelens(load["topk-l3"], root / "topk-saelens"),
                    "topk-dl": write_dictionary_learning(load["topk-l3"], root / "topk-dl")},
        "calm": {"calm-gguf": write_repeng_gguf(calm, root / "calm.gguf"),
                 "calm-npy": write_npy_rows(calm, root / "calm.npy", n_layers=4)},
    }


@pytest.fixture(scope="module")
def outputs(artifacts, copies):
    settings = artifacts.settings
    for native, named in copies.items():
        key = "vectors" if native in artifacts.vectors else "saes"
        settings[key].update({n: str(p) for n, p in named.items()})
    cases = {"unsteered": None}
    for native, named in copies.items():
        for name in [native, *named]:
            cases[name] = {"interventions": STEERINGS[native](name)}
    names = list(cases)
    llm = make_llm(artifacts, "eager", settings=settings)
    try:
        prompts = [prompt(7, 20)] * len(names)  # one prompt: each copy must reproduce its native run
        return dict(zip(names, run(llm, prompts, [cases[n] for n in names])))
    finally:
        close(llm)


@pytest.mark.parametrize("native", list(STEERINGS))
def test_every_format_steers_like_the_native_file(native, copies, outputs):
    reference = outputs[native]
    assert list(reference.token_ids) != list(outputs["unsteered"].token_ids) or \
        first_logprobs(reference) != first_logprobs(outputs["unsteered"]), "the steering has no effect"
    for name in copies[native]:
        out = outputs[name]
        assert list(out.token_ids) == list(reference.token_ids), name
        ref_lp = first_logprobs(reference)
        for tok, lp in first_logprobs(out).items():
            assert lp == pytest.approx(ref_lp[tok], abs=1e-4), (name, tok)
