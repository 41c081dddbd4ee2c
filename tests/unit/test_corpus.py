"""The SAE's training corpus: the instruction set, the data file's round trip, the shipped corpus and the mix
fit-sae trains on (the model-written answers, with licences/docstrings as a minority)."""
import gzip
import json

import pytest

from sae_steer import corpus


def test_instruction_set_covers_every_topic_deterministically():
    every = corpus.instruction_set()
    n_subjects = sum(len(s) for s in corpus.TOPICS.values())
    assert len(every) == len(set(every)) == n_subjects * len(corpus.TEMPLATES)
    assert corpus.instruction_set(50, seed=3) == corpus.instruction_set(50, seed=3) != corpus.instruction_set(50)
    assert corpus.instruction_set(50) == every[:50]
    # a sample of a few hundred still reaches every topic
    sample = corpus.instruction_set(300)
    for topic, subjects in corpus.TOPICS.items():
        assert any(s in ins for s in subjects for ins in sample), topic


def test_corpus_file_round_trip_is_byte_stable(tmp_path):
    rows = [{"instruction": "Describe snow.", "text": "Snow is cold — and white.", "tokens": 7},
            {"instruction": "Say hi.", "text": "Hi!", "tokens": 2}]
    a = corpus.write_corpus(rows, tmp_path / "a.jsonl.gz", {"model": "m", "seed": 0})
    b = corpus.write_corpus(rows, tmp_path / "b.jsonl.gz", {"model": "m", "seed": 0})
    assert a.read_bytes() == b.read_bytes()  # gzip without a timestamp: the same rows, the same file
    assert corpus.read_corpus(a) == ({"model": "m", "seed": 0}, rows)
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="provenance"):
        corpus.read_corpus(bad)


def test_the_shipped_corpus_has_provenance_and_everyday_concepts():
    path = corpus.default_corpus_path("smollm2")
    assert path.stat().st_size < 2_000_000
    provenance, rows = corpus.read_corpus(path)
    assert provenance["model"] == "SmolLM2-135M-Instruct" and "Apache-2.0" in provenance["licence"]
    assert {"command", "date", "seed", "dtype", "n_tokens"} <= provenance.keys()
    assert provenance["n_rows"] == len(rows) and provenance["n_tokens"] == sum(r["tokens"] for r in rows)
    text = " ".join(r["text"].lower() for r in rows)
    for word in ("snow", "winter", "happy", "food", "bread", "ocean", "dog", "work", "city", "pirate"):
        assert f" {word}" in text, word


def test_training_corpus_mixes_in_local_text_as_a_minority(tmp_path):
    rows = [{"instruction": f"i{k}", "text": f"Answer number {k} about the weather and the sea.", "tokens": 9}
            for k in range(60)]
    path = corpus.write_corpus(rows, tmp_path / "c.jsonl.gz", {"model": "SmolLM2-135M-Instruct"})
    train, held, about = corpus.training_corpus("smollm2", path)
    local_train, local_held = corpus.local_corpus()
    local = set(local_train + local_held)
    mixed = train + held
    assert len(mixed) == 60 + 60 // corpus.LOCAL_EVERY == about["texts"]
    assert sum(t in local for t in mixed) == 60 // corpus.LOCAL_EVERY  # one local chunk per LOCAL_EVERY answers
    assert len(held) == len(mixed) // corpus.HELD_OUT_EVERY and not set(held) & set(train)
    assert about["provenance"] == {"model": "SmolLM2-135M-Instruct"} and about["file"] == "c.jsonl.gz"
