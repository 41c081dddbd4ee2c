"""Feature records: what each feature of a fitted SAE fires on and what it writes to the logits, stored beside
the SAE so that people (and the server's feature routes) can browse and search features.

    records = build_feature_records(sae, activations, token_ids, tokenizer, head, doc_ids=...)
    save_feature_records(records, sae_dir)            -> sae_dir/features.jsonl
    book = FeatureRecords.load(sae_dir)               -> book.get(i), book.search("cold")
    records_from_capture(sae, capture_dir, tokenizer, head)   the same over sae_steer.capture's shards

One JSON object per line, in feature order:
    {"index": i, "label": "cold, winter -> snow, ice",
     "frequency": fraction of corpus tokens where the feature is active (> 0),
     "max_activation": its largest activation,
     "contexts": [{"activation": a, "tokens": ["...", ...], "at": j}, ...]   top `top_n`, highest first;
                 tokens[j] is the token where it fired (the stream there has read it), with up to
                 `context` tokens before it and `after` after it, never crossing a document boundary,
     "logit_lens": {"top": [["token", e], ...], "bottom": [...]}}
                 e = the feature's unit direct effect on the logits (vllm_plugin/logit_bias.py):
                 l = W_U (g * W_dec[i]), e = l / max|l|, so a `logit` intervention of strength s adds
                 s * e to that token's logit.

Labels are heuristic: the two most common words where the feature fired most (the whole word around the
token it fired on: subword pieces merged, word_at), then the two highest logit-lens tokens that begin a word
(a leading space and letters only, and a whole word of the corpus: continuation pieces such as "ing",
first pieces of longer words such as " miscon", punctuation and whitespace left out, promoted_words). They
summarize, they do not explain; a human or model-written explanation (a Neuronpedia-style label file,
`features.load_labels`) is better. Search matches the same whole words.
"""
from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from sae_steer.sae import SparseAutoencoder
from sae_steer.vllm_plugin.logit_bias import LogitHead

RECORDS_FILE = "features.jsonl"
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")  # letters/digits, any script; "don't" is one word


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _chunks(activations, size: int) -> Iterable[torch.Tensor]:
    if isinstance(activations, torch.Tensor):
        activations = [activations]
    for shard in activations:
        for start in range(0, shard.shape[0], size):
            yield shard[start:start + size]


@torch.no_grad()
def top_activations(sae: SparseAutoencoder, activations, top_n: int = 8, chunk: int = 1024):
    """Stream activations ([N, d_model] or shards of it, in order) through the SAE.
    -> (values [d_sae, top_n], token indices [d_sae, top_n] (-1: fewer than top_n active tokens),
        active counts [d_sae], N); each feature's highest activations first."""
    sae = sae.to(dtype=torch.float32)
    best_val = torch.full((sae.d_sae, top_n), float("-inf"))
    best_idx = torch.full((sae.d_sae, top_n), -1, dtype=torch.long)
    active = torch.zeros(sae.d_sae, dtype=torch.long)
    seen = 0
    for x in _chunks(activations, chunk):
        f = sae.encode(x.float()).T  # [d_sae, n]
        active += (f > 0).sum(dim=1)
        idx = torch.arange(seen, seen + f.shape[1]).expand_as(f)
        val, pick = torch.cat([best_val, f], dim=1).topk(top_n, dim=1)
        best_val, best_idx = val, torch.cat([best_idx, idx], dim=1).gather(1, pick)
        seen += f.shape[1]
    best_idx[best_val <= 0] = -1  # an inactive feature has no top context
    return best_val, best_idx, active, seen


def _as_head(unembedding) -> LogitHead:
    if isinstance(unembedding, LogitHead):
        return unembedding
    return LogitHead(unembedding, torch.ones(unembedding.shape[1]), centered=False)  # no final norm given


@torch.no_grad()
def build_feature_records(sae: SparseAutoencoder, activations, token_ids: torch.Tensor, tokenizer, unembedding, *,
                          doc_ids: torch.Tensor | None = None, top_n: int = 8, context: int = 8, after: int = 2,
                          lens_k: int = 10, chunk: int = 1024) -> list[dict]:
    """Records of every feature (module docstring).

    activations: [N, d_model] or an iterable of shards of it, in corpus order (the SAE's layer);
    token_ids [N]: the token at each position; doc_ids [N]: which document it belongs to (contexts stay
    inside one); tokenizer: anything with `decode([id])`; unembedding: a LogitHead (`logit_bias.head_of_hf`
    or `head_of_vllm`: the unembedding with the final norm's gain) or a bare W_U [vocab, d_model]."""
    token_ids = torch.as_tensor(token_ids).long()
    values, index, active, n = top_activations(sae, activations, top_n, chunk)
    if n != token_ids.shape[0]:
        raise ValueError(f"{n} activations but {token_ids.shape[0]} token ids")
    tokens = token_ids.tolist()  # plain lists: millions of single-element reads below
    docs = [0] * n if doc_ids is None else torch.as_tensor(doc_ids).tolist()
    pieces: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in pieces:
            pieces[t] = tokenizer.decode([t])
        return pieces[t]

    lens = _logit_lens_tokens(sae, _as_head(unembedding), lens_k, piece)
    vocabulary = corpus_words([piece(t) for t in tokens], docs)
    records = []
    for i in range(sae.d_sae):
        contexts = []
        for a, p in zip(values[i].tolist(), index[i].tolist()):
            if p < 0:
                continue
            lo, hi = max(0, p - context), min(n, p + after + 1)
            span = [q for q in range(lo, hi) if docs[q] == docs[p]]
            contexts.append({"activation": a, "tokens": [piece(tokens[q]) for q in span],
                             "at": span.index(p)})
        record = {"index": i, "frequency": active[i].item() / max(n, 1),
                  "max_activation": max(values[i, 0].item(), 0.0), "contexts": contexts, "logit_lens": lens[i]}
        record["label"] = auto_label(record, vocabulary)
        records.append(record)
    return records


def _logit_lens_tokens(sae: SparseAutoencoder, head: LogitHead, k: int, piece, batch: int = 256) -> list[dict]:
    out = []
    for start in range(0, sae.d_sae, batch):
        effects = head.unit_effects(sae.W_dec[start:start + batch])  # [b, vocab]
        kk = min(k, effects.shape[1])
        top, bottom = effects.topk(kk, dim=1), effects.topk(kk, dim=1, largest=False)
        for row in range(effects.shape[0]):
            out.append({name: [[piece(t), round(v, 4)] for t, v in zip(r.indices[row].tolist(), r.values[row].tolist())]
                        for name, r in (("top", top), ("bottom", bottom))})
    return out


def _piece(token: str) -> str:
    """A decoded token piece; byte-level BPE symbols (GPT-2's Ġ for a space, Ċ for a newline) read as
    what they stand for, in case a tokenizer's decode left them."""
    return token.replace("\u0120", " ").replace("\u010a", "\n")


def _continues_word(piece: str) -> bool:
    """A piece that carries on the word before it: starts with a letter, a digit or an apostrophe (no space)."""
    return bool(piece) and (piece[0].isalnum() or piece[0] == "'")


def word_at(tokens: list[str], at: int) -> str:
    """The whole word around tokens[at], subword pieces merged (["The", " sn", "ow", "man", " fell"], 2 -> "snowman");
    "" when the token holds no letters or digits (punctuation, whitespace)."""
    pieces = [_piece(t) for t in tokens]
    if not words(pieces[at]):
        return ""
    lo = at
    while lo > 0 and _continues_word(pieces[lo]) and words(pieces[lo - 1]) and pieces[lo - 1][-1].isalnum():
        lo -= 1
    hi = at
    while hi + 1 < len(pieces) and _continues_word(pieces[hi + 1]) and pieces[hi][-1:].isalnum():
        hi += 1
    found = words("".join(pieces[lo:hi + 1]))
    # the merged span may hold several words when the fired piece sits between punctuation-joined ones
    # ("cold-" "ness"): keep the one the fired token is part of
    inside = words(pieces[at])
    return next((w for w in found if inside[0] in w), found[0]) if found else ""


def corpus_words(pieces: list[str], docs: list[int]) -> set[str]:
    """Every whole word of a token stream (decoded pieces, subword pieces merged as word_at does, never across
    documents): what tells a whole promoted word (" snow") from the first piece of a longer one (" miscon")."""
    out, current = set(), ""
    for q, piece in enumerate(_piece(t) for t in pieces):
        joins = q > 0 and docs[q] == docs[q - 1] and _continues_word(piece) and current
        current = current + piece if joins else piece
        if q + 1 == len(pieces) or docs[q + 1] != docs[q] or not _continues_word(_piece(pieces[q + 1])) \
                or not current[-1:].isalnum():
            out.update(words(current))
            current = ""
    return out


def promoted_words(lens_top: list, k: int = 2, vocabulary: set[str] | None = None) -> list[str]:
    """The first k distinct words among logit-lens tokens that begin a word (a leading space, then letters
    only, at least two) and, given a vocabulary (corpus_words), are whole words of it: continuation pieces,
    first pieces of longer words, punctuation, digits and whitespace tokens are left out."""
    out: list[str] = []
    for token, _ in lens_top:
        piece = _piece(token)
        body = piece.strip().lower()
        if piece[:1].isspace() and len(body) >= 2 and body.isalpha() and body not in out and \
                (vocabulary is None or body in vocabulary):
            out.append(body)
            if len(out) == k:
                break
    return out


def auto_label(record: dict, vocabulary: set[str] | None = None) -> str:
    """Heuristic: the two most common words where the feature fired most, then its two top promoted words
    (whole words of `vocabulary` when given)."""
    fired = collections.Counter(w for c in record["contexts"] if (w := word_at(c["tokens"], c["at"])))
    reads = [w for w, _ in fired.most_common(2)]
    writes = promoted_words(record["logit_lens"]["top"], vocabulary=vocabulary)
    if not reads and not writes:
        return "(no word tokens)"
    return f"{', '.join(reads) or '?'} -> {', '.join(writes) or '?'}"


def save_feature_records(records: list[dict], sae_dir: str | Path) -> Path:
    path = Path(sae_dir) / RECORDS_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)  # readers never see a half-written file
    return path


class FeatureRecords:
    """The records of one SAE, loaded from its folder (or a features.jsonl path)."""

    def __init__(self, records: list[dict]):
        self.records = records
        for i, r in enumerate(records):
            if r.get("index") != i:
                raise ValueError(f"feature records are not in feature order at line {i + 1}")

    @classmethod
    def load(cls, path: str | Path) -> "FeatureRecords":
        path = Path(path)
        if path.is_dir():
            path = path / RECORDS_FILE
        with open(path, encoding="utf-8") as f:
            return cls([json.loads(line) for line in f if line.strip()])

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(f"feature {index} is out of range (d_sae={len(self.records)})")
        return self.records[index]

    def search(self, word: str, limit: int = 10) -> list[dict]:
        """Features whose records mention `word` (case-insensitive, whole words), best first:
        score = 3 per top context firing on the word (word_at: subword pieces merged) + 1 per top context
        containing it elsewhere + 2 when a top logit-lens token is the word (one that begins a word). -> [{"index", "label", "score"}]."""
        target = words(word)
        if len(target) != 1:
            raise ValueError(f"search for one word, got {word!r}")
        target = target[0]
        hits = []
        for r in self.records:
            score = 0
            for c in r["contexts"]:
                if word_at(c["tokens"], c["at"]) == target:
                    score += 3
                elif target in words("".join(_piece(t) for t in c["tokens"])):
                    score += 1
            score += 2 * (target in promoted_words(r["logit_lens"]["top"], k=len(r["logit_lens"]["top"])))
            if score:
                hits.append({"index": r["index"], "label": r["label"], "score": score})
        hits.sort(key=lambda h: (-h["score"], h["index"]))
        return hits[:limit]


def records_from_capture(sae: SparseAutoencoder, capture_dir: str | Path, tokenizer, unembedding, **options) -> list[dict]:
    """build_feature_records over the shards of sae_steer.capture at the SAE's layer, one shard in memory at a time."""
    from safetensors import safe_open

    from sae_steer.capture import load_field
    capture_dir = Path(capture_dir)
    manifest = json.loads((capture_dir / "manifest.json").read_text())
    if sae.layer not in manifest["layers"]:
        raise ValueError(f"{capture_dir} holds layers {manifest['layers']}, the SAE reads layer {sae.layer}")

    def shards():
        for shard in manifest["shards"]:
            with safe_open(str(capture_dir / shard["file"]), framework="pt") as f:
                x = f.get_tensor(f"L{sae.layer}")
                # Position 0 of a text is an attention sink (a stream norm ~100x the rest): it would top every
                # feature's contexts while saying nothing about the text. Zeroed, it activates as a blank.
                yield x.masked_fill((f.get_tensor("pos") == 0)[:, None], 0)

    return build_feature_records(sae, shards(), load_field(capture_dir, "tokens"), tokenizer, unembedding,
                                 doc_ids=load_field(capture_dir, "doc"), **options)
