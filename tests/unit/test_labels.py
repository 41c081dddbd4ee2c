"""Feature labels a person can read: whole words where a feature fired (subword pieces merged), promoted words that
begin a word (no continuation pieces, punctuation, whitespace or byte-level BPE symbols)."""
from sae_steer.feature_records import FeatureRecords, auto_label, corpus_words, promoted_words, word_at


def test_word_at_merges_subword_pieces_around_the_fired_token():
    tokens = ["The", " sn", "ow", "man", " fell", ".", " It", " was", " cold", "ness", "!"]
    assert word_at(tokens, 1) == "snowman"  # fired on the first piece
    assert word_at(tokens, 2) == "snowman"  # ... a middle one
    assert word_at(tokens, 3) == "snowman"  # ... the last one
    assert word_at(tokens, 4) == "fell"  # a word of one piece, not merged with its neighbours
    assert word_at(tokens, 8) == "coldness"
    assert word_at(tokens, 5) == "" and word_at(tokens, 10) == ""  # punctuation: no word
    assert word_at(["\n\n"], 0) == ""  # whitespace
    assert word_at(["Ġwin", "ter"], 1) == "winter"  # a byte-level BPE symbol left in by a decoder
    assert word_at([" don", "'t", " go"], 0) == "don't"


def test_promoted_words_keep_only_tokens_that_begin_a_word():
    top = [["ing", 1.0], [" ,", 0.9], ["\n", 0.8], [" Snow", 0.7], [" 1990", 0.6], [" snow", 0.5], ["ĠWinter", 0.4],
           [" a", 0.3], [" ice", 0.2]]
    assert promoted_words(top) == ["snow", "winter"]  # "ing", punctuation, newline, digits, duplicates left out
    assert promoted_words(top, k=5) == ["snow", "winter", "ice"]  # " a": one letter
    assert promoted_words([["ing", 1.0], ["ed", 0.5]]) == []
    # with the corpus's words: the first piece of a longer word (" miscon" of "misconception") is left out
    vocabulary = corpus_words([" a", " miscon", "ception", " of", " snow", ".", " Winter", "!"], [0] * 8)
    assert vocabulary == {"a", "misconception", "of", "snow", "winter"}
    assert promoted_words([[" miscon", 1.0], [" snow", 0.9], [" winter", 0.8]], vocabulary=vocabulary) == \
        ["snow", "winter"]
    assert corpus_words([" sn", "ow", " sn"], [0, 0, 1]) == {"snow", "sn"}  # never merged across documents


def _record(contexts, top):
    return {"index": 0, "contexts": [{"activation": 1.0, "tokens": t, "at": at} for t, at in contexts],
            "logit_lens": {"top": [[t, 1.0] for t in top], "bottom": []}, "frequency": 0.1, "max_activation": 1.0}


def test_auto_label_reads_whole_words_and_promoted_words():
    record = _record([([" a", " sn", "owy", " day"], 2), ([" the", " snow", "."], 1), ([" fresh", " snow"], 1),
                      ([" cold", ","], 1)], ["ing", " flakes", "ĠWinter", " flakes"])
    assert auto_label(record) == "snow, snowy -> flakes, winter"
    assert auto_label(_record([([".", ","], 0)], ["ing", "!"])) == "(no word tokens)"
    assert auto_label(_record([], [" ice"])) == "? -> ice"


def test_search_matches_a_word_split_into_pieces():
    book = FeatureRecords([
        _record([([" a", " sn", "ow", "y", " day"], 3), ([" sn", "ow"], 1)], [" flakes"]),
        {**_record([([" the", " snow", " fell"], 2)], [" snow"]), "index": 1}])
    for r in book.records:
        r["label"] = auto_label(r)
    hits = book.search("snowy")
    assert hits == [{"index": 0, "label": book.records[0]["label"], "score": 3}]
    snow = {h["index"]: h["score"] for h in book.search("snow")}
    assert snow == {0: 3, 1: 1 + 2}  # 0: fired on "snow" once ("snowy" is another word); 1: in a context + promoted


def test_interpretability_check_finds_the_concepts_feature_and_reads_its_label(tmp_path):
    """The search finds, per concept, the feature firing on its words; the check passes only when the top contexts
    fire on concept words and the label names one."""
    import json

    from sae_steer.evaluate import interpretability_check
    from sae_steer.feature_records import save_feature_records
    records = [
        _record([([" deep", " sn", "ow"], 2), ([" the", " winter", " sky"], 1)], [" cold"]),  # cold: passes
        _record([([" a", " happy", " day"], 1)], [" the"]),  # joy: fires on "happy"
        _record([([" the", " river"], 1)], [" stone"]),  # mentions nothing
    ]
    for i, r in enumerate(records):
        r["index"] = i
        r["label"] = auto_label(r)
    records[1]["label"] = "river -> stone"  # a label that does not say what the contexts show
    save_feature_records(records, tmp_path)
    got = interpretability_check(tmp_path, ["cold", "joy", "pirate"])
    assert got["cold"]["feature"] == 0 and got["cold"]["fired_on"] == ["snow", "winter"]
    assert got["cold"]["contexts_on_concept"] == 2 and got["cold"]["label_says"] and got["cold"]["passed"]
    assert got["joy"]["feature"] == 1 and got["joy"]["contexts_on_concept"] == 1
    assert not got["joy"]["label_says"] and not got["joy"]["passed"]
    assert got["pirate"] == {"feature": None, "passed": False, "search_words": got["pirate"]["search_words"]}
    assert json.dumps(got)  # goes into metrics.json


def test_pick_feature_prefers_a_concept_feature_aligned_with_the_caa_vector(tmp_path):
    """Of the features whose top contexts mostly fire on concept words, the one pointing where the CAA vector
    points; the search's top hit (a one-word detector here) is not taken just for scoring highest."""
    import torch

    from sae_steer.evaluate import load_concept, pick_feature, search_concept
    from sae_steer.feature_records import save_feature_records
    from sae_steer.sae import SparseAutoencoder
    records = [
        _record([([" the", " ice"], 1)] * 8, [" ice"]),  # fires on "ice" everywhere: the search's best
        _record([([" a", " frozen"], 1)] * 3 + [([" so", " icy"], 1)] * 3 + [([" the", " road"], 1)] * 2, [" the"]),
        _record([([" a", " frozen"], 1)] * 3 + [([" the", " road"], 1)] * 5, [" the"]),  # 3 of 8: not a candidate
    ]
    for i, r in enumerate(records):
        r["index"], r["label"] = i, auto_label(r)
    save_feature_records(records, tmp_path)
    W_dec = torch.eye(3, 4)
    sae = SparseAutoencoder(architecture="relu", W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(3), W_dec=W_dec,
                            b_dec=torch.zeros(4), layer=2)
    cold = load_concept("cold")
    from sae_steer.feature_records import FeatureRecords
    assert search_concept(FeatureRecords.load(tmp_path), cold)[0] == 0
    caa = {2: torch.tensor([0.3, 1.0, 2.0, 0.0])}  # closest to feature 2's row, then 1's, then 0's
    feature, note = pick_feature(sae, tmp_path, cold, caa)
    assert feature == 1 and "2 features" in note  # 2 is closer but fires on the concept in only 3 contexts
    assert pick_feature(sae, tmp_path, cold, {2: torch.tensor([1.0, 0.0, 0.0, 0.0])})[0] == 0
