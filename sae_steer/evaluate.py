"""`sae-steer eval`: steering quality, measured (in the spirit of AxBench, Wu et al. 2025), and calibration.

For a concept of sae_steer/data/concepts.json (cold / winter, joy / happiness, food / cooking, pirate speech:
a weather topic, an emotion, a topic, a style) and 48 everyday instructions (sae_steer/data/instructions.txt,
split alternately into a *selection* half and a *test* half), the served model answers each instruction
(greedy, `max_tokens` tokens, chat template when the model has one) under:

    none      no steering
    prompt    the instruction + "Mention cold weather, snow or winter in your answer." (the prompting baseline)
    caa       a CAA vector (mean difference over local contrast pairs of each text's stream averaged over its
              positions, built on this engine through its own capture path: build_caa_vector) at each layer x coef
    sae       residual `add` of one SAE feature (pick_feature: of the features whose top contexts mostly fire
              on the concept's words, the one whose decoder row is most aligned with the CAA vector at the SAE's
              layer; without such features, the feature-records search's best hit or the best-aligned row),
              strengths chosen so that the edit's norm equals coef x |CAA vector| at that layer, or with
              sae_doses, dose x the unsteered stream's mean norm there (`sae-steer eval --sae-doses`)
    logit     the same feature's logit-space steering, strength in logits at its most promoted token

Every answer is scored 0-2 by three judges built from what is on this machine (no hosted judge):

    concept    word list: 0 no concept word, 1 one, 2 two or more (whole words, lower case, a plural "s" dropped)
    fluency    the answer's mean negative log-likelihood per token under the *unsteered* model with an empty
               instruction (nll), against the median nll of the unsteered answers (base):
               2 if nll <= base + 0.5, 1 if nll <= base + 1.5, else 0; then capped for repetition: distinct word
               trigrams / trigrams < 0.5 -> 0, < 0.8 -> at most 1; fewer than 3 words -> 0
    relevance  pointwise mutual information of answer and instruction under the unsteered model, per token:
               pmi = (log p(answer | instruction) - log p(answer | empty instruction)) / n_tokens, against the
               median pmi of the unsteered answers (base, floored at 0.05): 2 if pmi >= 0.5 base,
               1 if pmi >= 0.2 base, else 0

and their harmonic mean (0 when any is 0), averaged over instructions. Per method (CAA: per layer too), the
setting with the best mean harmonic mean on the selection half is chosen and reported on the test half;
`calibrate` stores it beside the vector / SAE (sae_steer/calibration.py) for `"coef": "auto"`. Each setting's
dose is the edit's norm over the unsteered stream's mean norm at its layer (stream_norms), and its spread over
the test instructions a bootstrap interval (bootstrap_interval).

`--concept all` (or a comma-separated list) runs every concept on one engine and adds the summary over
concepts (run_eval_concepts): per concept and method the chosen test HM with its interval and dose, the mean
over concepts, and the ratios CAA/prompting and SAE/CAA against the goals (GOALS), with paired bootstrap
intervals, in benchmarks/results/eval-<model>-<date>.{json,md,png}.

The judges' limits are written in the README ("Steering quality (eval) and calibration").
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"

# judge thresholds (documented in the module docstring and the README)
FLUENCY_NLL_MARGIN = (0.5, 1.5)  # nats/token above the unsteered median: <= first -> 2, <= second -> 1
REPETITION_CAP = (0.5, 0.8)  # distinct word-trigram ratio: below first -> 0, below second -> at most 1
RELEVANCE_PMI_FRACTION = (0.5, 0.2)  # of the unsteered median pmi: >= first -> 2, >= second -> 1
MIN_RECORD_SCORE = 3  # feature-records search score a feature needs to be picked (pick_feature)
MIN_CONTEXTS_ON_CONCEPT = 4  # of a feature's top contexts (8 by default) firing on a concept word (pick_feature)
RELEVANCE_BASE_FLOOR = 0.05  # nats/token: the base pmi used when the unsteered answers' median is below it
BOOTSTRAP_SAMPLES = 2000  # resamples of the test instructions for the intervals


def _say(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


# ---- concepts and instructions ----

@dataclass
class Concept:
    name: str
    description: str
    prompt_suffix: str
    words: list[str]
    pairs: list[tuple[str, str]]  # (positive: shows the concept, negative: its opposite)
    search_words: list[str] = field(default_factory=list)


def load_concept(name: str = "cold", path: str | Path | None = None) -> Concept:
    data = json.loads(Path(path or DATA / "concepts.json").read_text(encoding="utf-8"))
    if name not in data:
        raise ValueError(f"unknown concept {name!r}; known: {sorted(data)}")
    c = data[name]
    return Concept(name=name, description=c["description"], prompt_suffix=c["prompt_suffix"], words=c["words"],
                   pairs=[tuple(p) for p in c["pairs"]], search_words=c.get("search_words", [name]))


def concept_names(spec: str, path: str | Path | None = None) -> list[str]:
    """A --concept argument: one name, names separated by commas, or 'all' (every concept of the file)."""
    known = list(json.loads(Path(path or DATA / "concepts.json").read_text(encoding="utf-8")))
    names = known if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"concept: unknown {unknown or spec!r}; known: {known} (or 'all')")
    return names


def load_instructions(path: str | Path | None = None) -> list[str]:
    lines = Path(path or DATA / "instructions.txt").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


# ---- judges ----

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _norm(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def concept_hits(text: str, words: list[str]) -> int:
    """How many words of `text` are concept words (whole words, case-insensitive, a plural 's' ignored)."""
    lexicon = {_norm(w.lower()) for w in words}
    return sum(_norm(w) in lexicon for w in _words(text))


def concept_score(text: str, words: list[str]) -> int:
    hits = concept_hits(text, words)
    return 2 if hits >= 2 else hits


def distinct_trigram_ratio(text: str) -> float:
    """Distinct word trigrams / word trigrams (1.0 for texts too short to repeat a trigram)."""
    w = _words(text)
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def fluency_score(text: str, nll: float, base_nll: float) -> int:
    """0-2 from the answer's mean nll/token under the unsteered model vs the unsteered answers' median."""
    if len(_words(text)) < 3 or not math.isfinite(nll):
        return 0
    delta = nll - base_nll
    score = 2 if delta <= FLUENCY_NLL_MARGIN[0] else 1 if delta <= FLUENCY_NLL_MARGIN[1] else 0
    ratio = distinct_trigram_ratio(text)
    if ratio < REPETITION_CAP[0]:
        return 0
    if ratio < REPETITION_CAP[1]:
        return min(score, 1)
    return score


def relevance_score(pmi: float, base_pmi: float) -> int:
    """0-2 from the per-token pmi of answer and instruction vs the unsteered answers' median."""
    if not math.isfinite(pmi):
        return 0
    base = max(base_pmi, RELEVANCE_BASE_FLOOR)
    return 2 if pmi >= RELEVANCE_PMI_FRACTION[0] * base else 1 if pmi >= RELEVANCE_PMI_FRACTION[1] * base else 0


def harmonic_mean(*scores: float) -> float:
    """AxBench's aggregate: 0 when any score is 0."""
    if any(s <= 0 for s in scores):
        return 0.0
    return len(scores) / sum(1.0 / s for s in scores)


# ---- prompts and likelihoods on the engine ----

def render(tokenizer, instruction: str) -> list[int]:
    """The prompt's token ids: the model's chat template when it has one, else a plain Q/A frame."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"Instruction: {instruction}\nAnswer:", add_special_tokens=True)["input_ids"]


def answer_logprobs(llm, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
    """sum_t log p(answer_t | prompt, answer_<t) under the engine's unsteered model, one pass per pair
    (vLLM prompt_logprobs over prompt + answer)."""
    from vllm import SamplingParams
    todo = [(i, p + a, len(p)) for i, (p, a) in enumerate(zip(prompts, answers)) if a]
    out = [0.0] * len(prompts)
    if not todo:
        return out
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    results = llm.generate([{"prompt_token_ids": ids} for _, ids, _ in todo], params, use_tqdm=False)
    for (i, ids, start), res in zip(todo, results):
        out[i] = sum(res.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids)))
    return out


def build_caa_vector(llm, pairs: list[tuple[str, str]], layers: list[int], positions: str = "mean") -> dict[int, torch.Tensor]:
    """A CAA vector on this engine, read through the plugin's capture path: v_L = mean over pairs of
    x_L(positive) - x_L(negative), x_L the residual stream after layer L

        positions="last"  at each text's last token (Panickssery et al. 2024; POST /v1/steering/vectors)
        positions="mean"  averaged over each text's positions after the first (the first token's stream is an
                          attention sink with a large norm); for concept sentences, whose last token is a period,
                          this carries the concept where "last" barely does (SmolLM2, cold/winter: see the README)

    The layers must be steerable on `llm`."""
    from sae_steer.capture import capture_with_llm
    if positions not in ("mean", "last"):
        raise ValueError(f"positions must be 'mean' or 'last', got {positions!r}")
    tok = llm.get_tokenizer()
    texts = [t for pair in pairs for t in pair]
    token_ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    acts = capture_with_llm(llm, [(f"pairs[{i // 2}][{i % 2}]", t) for i, t in enumerate(token_ids)], sorted(layers),
                            "last" if positions == "last" else "all")
    if positions == "mean":
        acts = [{L: x[1:].float().mean(0) if len(x) > 1 else x.float().mean(0) for L, x in a.items()} for a in acts]
    return {L: torch.stack([acts[2 * i][L].float() - acts[2 * i + 1][L].float() for i in range(len(pairs))]).mean(0)
            for L in layers}


# ---- the sweep ----

@dataclass
class Point:
    method: str  # none | prompt | caa | sae | logit
    layer: int | None = None
    strength: float | None = None  # coef (caa) / strength (sae add, logit)
    multiple: float | None = None  # caa/sae: the edit's norm in units of |CAA vector| at that layer
    steering: dict | None = None

    @property
    def label(self) -> str:
        if self.method in ("none", "prompt"):
            return self.method
        where = f"L{self.layer} " if self.layer is not None else ""
        return f"{self.method} {where}{self.strength:g}"


def search_concept(book, concept: Concept) -> tuple[int | None, dict[int, int]]:
    """(best feature or None, {feature: summed score}): the feature-records search (FeatureRecords.search, what
    GET /v1/steering/saes/{name}/features?search= serves) for each of the concept's search words, scores summed."""
    totals: dict[int, int] = {}
    for word in concept.search_words:
        for hit in book.search(word, limit=20):
            totals[hit["index"]] = totals.get(hit["index"], 0) + hit["score"]
    return (max(totals, key=lambda i: (totals[i], -i)) if totals else None), totals


def interpretability_check(sae_dir: str | Path, names: list[str] | None = None) -> dict[str, dict]:
    """For each concept (default: all), the feature the search finds, and whether it means the concept: how many
    of its top contexts fire on a concept word (the whole word, feature_records.word_at), and whether its label
    names one. `passed`: at least one such context and a label that says so."""
    from sae_steer.feature_records import FeatureRecords, word_at, words
    book = FeatureRecords.load(sae_dir)
    out = {}
    for name in names or concept_names("all"):
        concept = load_concept(name)
        lexicon = {_norm(w.lower()) for w in concept.words + concept.search_words}
        best, totals = search_concept(book, concept)
        if best is None:
            out[name] = {"feature": None, "passed": False, "search_words": concept.search_words}
            continue
        record = book.get(best)
        fired = [word_at(c["tokens"], c["at"]) for c in record["contexts"]]
        hits = sum(_norm(w) in lexicon for w in fired if w)
        label_says = any(_norm(w) in lexicon for w in words(record["label"]))
        out[name] = {"feature": best, "score": totals[best], "label": record["label"], "fired_on": fired,
                     "contexts_on_concept": hits, "contexts": len(fired), "label_says": label_says,
                     "frequency": record["frequency"], "passed": hits >= 1 and label_says,
                     "search_words": concept.search_words}
    return out


def concept_feature_candidates(book, concept: Concept) -> list[int]:
    """Features whose top contexts mostly fire on a word of the concept (its word list and search words, whole
    words: feature_records.word_at): at least MIN_CONTEXTS_ON_CONCEPT of them."""
    from sae_steer.feature_records import word_at
    lexicon = {_norm(w.lower()) for w in concept.words + concept.search_words}
    return [r["index"] for r in book.records
            if sum(_norm(word_at(c["tokens"], c["at"])) in lexicon for c in r["contexts"]) >= MIN_CONTEXTS_ON_CONCEPT]


def pick_feature(sae, sae_dir: Path | None, concept: Concept, caa: dict[int, torch.Tensor]) -> tuple[int, str]:
    """The SAE feature to steer with. With feature records beside the SAE: among the features whose top contexts
    mostly fire on the concept's words (concept_feature_candidates), the one whose decoder row is most aligned
    (cosine) with the CAA vector at the SAE's layer; without such features, the best hit of the search for the
    concept's words when it scores at least MIN_RECORD_SCORE; else the decoder row most aligned with the CAA
    vector. Why not simply the search's best hit: on a small SAE that is a one-word detector (SmolLM2 L15:
    feature 3101 fires on "ice" in all its top contexts and adding it brings no cold word, at any strength),
    while a feature firing on several of the concept's words and pointing where the contrast pairs point
    (feature 1961, "frozen, icy") steers toward the concept."""
    from sae_steer.feature_records import RECORDS_FILE, FeatureRecords
    v = caa.get(sae.layer)
    weak = ""
    if sae_dir is not None and (sae_dir / RECORDS_FILE).is_file():
        book = FeatureRecords.load(sae_dir)
        candidates = concept_feature_candidates(book, concept)
        if candidates and v is not None:
            cos = torch.nn.functional.cosine_similarity(sae.W_dec[candidates].float(), v.float()[None], dim=-1)
            best = candidates[int(cos.argmax())]
            return best, (f"{len(candidates)} features fire on the concept's words in >= {MIN_CONTEXTS_ON_CONCEPT} "
                          f"of their top contexts; the one most aligned with the CAA vector at layer {sae.layer}: "
                          f"feature {best} (cosine {float(cos.max()):.3f}, label {book.get(best).get('label')!r})")
        best, totals = search_concept(book, concept)
        if best is not None and totals[best] >= MIN_RECORD_SCORE:
            return best, (f"feature records search for {concept.search_words}: feature {best} "
                          f"(score {totals[best]}, label {book.get(best).get('label')!r})")
        weak = (f"feature records search for {concept.search_words}: best hit "
                + (f"feature {best}, score {totals[best]} (label {book.get(best).get('label')!r})" if best is not None
                   else "none") + f", below {MIN_RECORD_SCORE}; ")
    if v is None:
        raise ValueError(f"no feature records beside the SAE and no CAA vector at its layer {sae.layer} to pick a "
                         f"feature with")
    cos = torch.nn.functional.cosine_similarity(sae.W_dec.float(), v.float()[None], dim=-1)
    best = int(cos.argmax())
    return best, (f"{weak}decoder row most aligned with the CAA vector at layer {sae.layer}: feature {best} "
                  f"(cosine {float(cos[best]):.3f})")


def sweep_points(caa: dict[int, torch.Tensor], layers: list[int], coefs: list[float], sae=None,
                 sae_name: str | None = None, feature: int | None = None, logit_strengths: list[float] = (),
                 sae_doses: list[float] | None = None, norms: dict[int, float] | None = None) -> list[Point]:
    """none, prompt, CAA at each of `layers` x coefs, SAE add (edit norm = coef x |caa[sae.layer]|, or with
    sae_doses: dose x norms[sae.layer], the unsteered stream's mean norm there), logit."""
    points = [Point("none"), Point("prompt")]
    for L in sorted(layers):
        values = caa[L].tolist()
        points += [Point("caa", L, c, c, {"interventions": [{"type": "vector", "layer": L, "values": values,
                                                             "coef": c}]}) for c in coefs]
    if sae is not None:
        caa_norm = float(caa[sae.layer].norm())
        norm = caa_norm / max(float(sae.W_dec[feature].norm()), 1e-12)
        # a CAA vector much longer than the stream (pirate's at SmolLM2's layer 15: 1.45x) makes every multiple of
        # it an overdose: doses size the edit by the stream itself
        multiples = coefs if sae_doses is None else [d * norms[sae.layer] / caa_norm for d in sae_doses]
        for c in multiples:
            s = round(c * norm, 4)
            points.append(Point("sae", sae.layer, s, c, {"interventions": [
                {"type": "sae", "sae": sae_name, "feature": feature, "mode": "add", "strength": s}]}))
        points += [Point("logit", None, s, None, {"interventions": [
            {"type": "logit", "sae": sae_name, "feature": feature, "strength": s}]}) for s in logit_strengths]
    return points


def generate_answers(llm, points: list[Point], instructions: list[str], concept: Concept, max_tokens: int,
                     points_per_call: int = 4) -> list[list[list[int]]]:
    """answers[p][i]: the generated token ids of point p on instruction i (greedy)."""
    from vllm import SamplingParams
    tok = llm.get_tokenizer()
    plain = [render(tok, ins) for ins in instructions]
    prompted = [render(tok, ins + concept.prompt_suffix) for ins in instructions]
    out, start = [], time.monotonic()
    for b in range(0, len(points), points_per_call):
        chunk = points[b:b + points_per_call]
        prompts, params = [], []
        for p in chunk:
            for i in range(len(instructions)):
                prompts.append({"prompt_token_ids": prompted[i] if p.method == "prompt" else plain[i]})
                params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                             extra_args=None if p.steering is None else {"steering": p.steering}))
        results = llm.generate(prompts, params, use_tqdm=False)
        n = len(instructions)
        out += [[list(r.outputs[0].token_ids) for r in results[j * n:(j + 1) * n]] for j in range(len(chunk))]
        _say(f"generated {len(out)}/{len(points)} sweep points ({', '.join(p.label for p in chunk)}), "
             f"{time.monotonic() - start:.0f} s")
    return out


def score_answers(llm, instructions: list[str], answers: list[list[list[int]]],
                  concept: Concept) -> tuple[list[list[dict]], dict]:
    """Per point and instruction: text, nll, pmi, the three 0-2 scores and their harmonic mean; and the
    unsteered medians (point 0 must be `none`) that the fluency and relevance thresholds are relative to."""
    tok = llm.get_tokenizer()
    conditioned = [render(tok, ins) for ins in instructions]
    empty = render(tok, "")
    flat = [(p, i) for p in range(len(answers)) for i in range(len(instructions))]
    t0 = time.monotonic()
    lp_cond = answer_logprobs(llm, [conditioned[i] for _, i in flat], [answers[p][i] for p, i in flat])
    lp_free = answer_logprobs(llm, [empty for _ in flat], [answers[p][i] for p, i in flat])
    _say(f"scored {len(flat)} answers (2 likelihood passes each) in {time.monotonic() - t0:.0f} s")
    rows = [[None] * len(instructions) for _ in answers]
    for (p, i), c, f in zip(flat, lp_cond, lp_free):
        ids = answers[p][i]
        n = max(len(ids), 1)
        text = tok.decode(ids, skip_special_tokens=True)
        rows[p][i] = {"text": text, "tokens": len(ids), "nll": -f / n if ids else float("inf"),
                      "pmi": (c - f) / n if ids else float("-inf"), "concept": concept_score(text, concept.words)}
    base = rows[0]  # the unsteered answers
    base_nll = statistics.median(r["nll"] for r in base if math.isfinite(r["nll"]))
    base_pmi = statistics.median(r["pmi"] for r in base if math.isfinite(r["pmi"]))
    for point_rows in rows:
        for r in point_rows:
            r["fluency"] = fluency_score(r["text"], r["nll"], base_nll)
            r["relevance"] = relevance_score(r["pmi"], base_pmi)
            r["hm"] = harmonic_mean(r["concept"], r["relevance"], r["fluency"])
    return rows, {"base_nll": base_nll, "base_pmi": base_pmi}


def summarize(rows: list[dict], idx: list[int]) -> dict:
    pick = [rows[i] for i in idx]
    return {k: sum(r[k] for r in pick) / len(pick) for k in ("concept", "relevance", "fluency", "hm")}


def bootstrap_interval(statistic, idx: list[int], n: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                       seed: int = 0) -> list[float]:
    """[low, high]: the percentile bootstrap interval of statistic(sample of idx), instructions drawn with
    replacement (`n` resamples, fixed seed). For the spread over instructions: a difference between two
    settings whose intervals overlap widely is not one to read much into."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(idx), (n, len(idx)), generator=g).tolist()
    values = sorted(statistic([idx[k] for k in draw]) for draw in draws)
    lo, hi = values[int((1 - level) / 2 * (n - 1))], values[int((1 + level) / 2 * (n - 1))]
    return [round(lo, 4), round(hi, 4)]


def stream_norms(llm, instructions: list[str], layers: list[int]) -> dict[int, float]:
    """Per layer, the mean norm of the unsteered residual stream over the rendered instructions' positions after
    the first (the attention sink): what an edit's norm is compared with (its dose)."""
    from sae_steer.capture import capture_with_llm
    tok = llm.get_tokenizer()
    acts = capture_with_llm(llm, [(f"instructions[{i}]", render(tok, ins)) for i, ins in enumerate(instructions)],
                            sorted(layers), "all")
    return {L: float(torch.cat([a[L][1:].float() for a in acts]).norm(dim=-1).mean()) for L in layers}


def select(points: list[Point], summaries: list[dict]) -> dict[str, int]:
    """Per method (and per CAA layer: key 'caa@L'), the point with the best selection-half mean harmonic
    mean (ties: the smaller strength). Methods with one point are their own choice."""
    groups: dict[str, list[int]] = {}
    for j, p in enumerate(points):
        groups.setdefault(p.method, []).append(j)
        if p.method == "caa":
            groups.setdefault(f"caa@{p.layer}", []).append(j)
    return {g: max(js, key=lambda j: (summaries[j]["select"]["hm"], -(abs(points[j].strength or 0))))
            for g, js in groups.items()}


# ---- outputs ----

def write_markdown(result: dict, path: Path) -> Path:
    r = result
    lines = [f"# Steering quality: concept {r['concept']['description']!r} on {r['model_name']}", "",
             f"{r['date']}, {r['device']}; {len(r['instructions'])} instructions ({len(r['split']['select'])} select, "
             f"{len(r['split']['test'])} test), greedy, {r['max_tokens']} tokens; judges: sae_steer/evaluate.py "
             f"(0-2 each, harmonic mean per answer, averaged). Unsteered medians: nll {r['base']['base_nll']:.3f}, "
             f"pmi {r['base']['base_pmi']:.3f} nats/token. SAE feature: {r.get('feature_note') or 'none'}. "
             f"Run time {r['seconds']:.0f} s.", "",
             "## Chosen settings (best harmonic mean on the select half, reported on the test half)", "",
             "Dose: the edit's norm over the mean norm of the unsteered stream at that layer; interval: 95% "
             "bootstrap over the test instructions.", "",
             "| method | layer | strength | dose | concept | relevance | fluency | **HM (test)** | 95% interval | "
             "HM (select) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in r["chosen_order"]:
        pt = r["points"][r["chosen"][g]]
        t, s = pt["test"], pt["select"]
        lo, hi = pt["test_hm_interval"]
        lines.append(f"| {g} | {pt['layer'] if pt['layer'] is not None else '-'} | "
                     f"{'-' if pt['strength'] is None else format(pt['strength'], 'g')} | "
                     f"{'-' if pt['dose'] is None else format(pt['dose'], '.2f')} | {t['concept']:.2f} | "
                     f"{t['relevance']:.2f} | {t['fluency']:.2f} | **{t['hm']:.3f}** | {lo:.2f}-{hi:.2f} | "
                     f"{s['hm']:.3f} |")
    lines += ["", "## Every sweep point (test half; CAA/SAE multiple = edit norm / |CAA vector| at that layer)", "",
              "| point | multiple | dose | concept | relevance | fluency | HM (test) | HM (select) |",
              "|---|---|---|---|---|---|---|---|"]
    for pt in r["points"]:
        t = pt["test"]
        lines.append(f"| {pt['label']} | {'-' if pt['multiple'] is None else format(pt['multiple'], 'g')} | "
                     f"{'-' if pt['dose'] is None else format(pt['dose'], '.2f')} | "
                     f"{t['concept']:.2f} | {t['relevance']:.2f} | {t['fluency']:.2f} | {t['hm']:.3f} | "
                     f"{pt['select']['hm']:.3f} |")
    lines += ["", "## Examples (chosen settings)", ""]
    for ex in r["examples"]:
        lines += [f"**{ex['instruction']}**", ""]
        for g, text in ex["answers"].items():
            lines.append(f"- *{g}*: {text.strip()!r}")
        lines.append("")
    if r.get("calibration"):
        lines += ["## Calibration written", ""] + [f"- {k}: `{v}`" for k, v in r["calibration"].items()] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    series: dict[str, list[dict]] = {}
    for pt in result["points"]:
        key = {"caa": f"CAA layer {pt['layer']}", "sae": f"SAE add (L{pt['layer']})", "logit": "logit"}.get(
            pt["method"], pt["method"])
        series.setdefault(key, []).append(pt)
    markers = iter("osD^v<>ph*")
    for key, pts in series.items():
        xs, ys = [p["test"]["concept"] for p in pts], [p["test"]["fluency"] for p in pts]
        m = next(markers, "o")
        ax.plot(xs, ys, marker=m, linestyle="-" if len(pts) > 1 else "none", label=key, markersize=8)
        if len(pts) > 1:
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(f"x{p['multiple']:g}" if p["multiple"] is not None else f"{p['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("concept score (0-2, test half)")
    ax.set_ylabel("fluency score (0-2, test half)")
    ax.set_xlim(-0.05, 2.05)
    ax.set_ylim(-0.05, 2.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"{result['concept']['description']} on {result['model_name']}: concept vs fluency\n"
                 f"(labels: coef / strength; best harmonic means in the .md)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the whole run ----

def run_eval(llm, *, concept: Concept, instructions: list[str], layers: list[int], coefs: list[float],
             sae_name: str | None = None, sae_path: str | Path | None = None, logit_strengths: list[float] = (),
             max_tokens: int = 48, results_dir: str | Path | None = None, vector_out: str | Path | None = None,
             calibrate: bool = True, model_name: str = "model", examples: int = 2, caa_positions: str = "mean",
             sae_doses: list[float] | None = None) -> dict:
    """Build the CAA vector, sweep, judge, select, write results (results_dir) and calibration. `llm` must serve
    `layers` (steerable) and, for SAE/logit steering, the SAE registered as `sae_name` (path `sae_path`).
    sae_doses: size the SAE edits by dose (see sweep_points) instead of the CAA coefs' multiples."""
    from sae_steer import calibration, formats
    t0 = time.monotonic()
    sae = formats.load_sae(sae_path) if sae_path is not None else None
    caa_layers = sorted(set(layers) | ({sae.layer} if sae is not None else set()))
    _say(f"concept {concept.description!r}: CAA vector from {len(concept.pairs)} contrast pairs at layers {caa_layers}")
    caa = build_caa_vector(llm, concept.pairs, caa_layers, caa_positions)
    feature, feature_note = None, None
    if sae is not None:
        feature, feature_note = pick_feature(sae, Path(sae_path) if Path(sae_path).is_dir() else None, concept, caa)
        _say(f"SAE feature: {feature_note}")
    norms = stream_norms(llm, instructions[:16], caa_layers)
    points = sweep_points(caa, layers, coefs, sae, sae_name, feature, logit_strengths, sae_doses, norms)
    n = len(instructions)
    split = {"select": list(range(0, n, 2)), "test": list(range(1, n, 2))}
    _say(f"{len(points)} sweep points x {n} instructions, {max_tokens} tokens each")
    answers = generate_answers(llm, points, instructions, concept, max_tokens)
    rows, base = score_answers(llm, instructions, answers, concept)
    summaries = [{half: summarize(rows[j], idx) for half, idx in split.items()} for j in range(len(points))]
    chosen = select(points, summaries)
    doses = [None if p.multiple is None else p.multiple * float(caa[p.layer].norm()) / norms[p.layer] for p in points]
    intervals = [bootstrap_interval(lambda sample, r=rows[j]: sum(r[i]["hm"] for i in sample) / len(sample),
                                    split["test"]) for j in range(len(points))]
    order = [g for g in ("none", "prompt", "caa", "sae", "logit") if g in chosen] + \
        sorted((g for g in chosen if g.startswith("caa@")), key=lambda g: int(g[4:]))

    result = {"concept": asdict(concept), "model_name": model_name, "instructions": instructions, "split": split,
              "max_tokens": max_tokens, "date": time.strftime("%Y-%m-%d"), "device": "CPU (vLLM CPU build)",
              "base": base, "feature": feature, "feature_note": feature_note,
              "sae_doses": sae_doses, "caa_norms": {str(L): float(v.norm()) for L, v in caa.items()},
              "stream_norms": {str(L): v for L, v in norms.items()},
              "thresholds": {"fluency_nll_margin": FLUENCY_NLL_MARGIN, "repetition_cap": REPETITION_CAP,
                             "relevance_pmi_fraction": RELEVANCE_PMI_FRACTION,
                             "relevance_base_floor": RELEVANCE_BASE_FLOOR},
              "points": [{"label": p.label, "method": p.method, "layer": p.layer, "strength": p.strength,
                          "multiple": p.multiple, "dose": doses[j], **summaries[j], "test_hm_interval": intervals[j],
                          "answers": rows[j]} for j, p in enumerate(points)],
              "chosen": chosen, "chosen_order": order}
    ex_idx = [i for i in split["test"] if "weather" in instructions[i].lower()][:1] + split["test"][:examples]
    result["examples"] = [{"instruction": instructions[i], "answers": {
        g: rows[chosen[g]][i]["text"] for g in order if not g.startswith("caa@")}} for i in dict.fromkeys(ex_idx)]

    if calibrate:
        cal = {}
        source = {"concept": concept.name, "model": model_name, "date": result["date"], "metric": "mean harmonic "
                  "mean of concept/relevance/fluency on the select half (sae_steer/evaluate.py)"}
        if vector_out is not None:
            vpath = formats.save_vector({L: caa[L] for L in layers}, vector_out, metadata={
                "method": f"caa-mean-difference ({caa_positions} of positions)", "concept": concept.name,
                "built_from_pairs": str(len(concept.pairs))})
            best = points[chosen["caa"]]
            per_layer = {points[chosen[f"caa@{L}"]].layer: {"coef": points[chosen[f"caa@{L}"]].strength,
                                                            "score": summaries[chosen[f"caa@{L}"]]["select"]["hm"]}
                         for L in layers}
            cal["vector"] = str(calibration.save_vector_calibration(
                vpath, best.layer, best.strength, score=summaries[chosen["caa"]]["select"]["hm"],
                per_layer=per_layer, source=source))
            cal["vector_file"] = str(vpath)
        if sae is not None:
            for kind, method in (("add", "sae"), ("logit", "logit")):
                if method in chosen:
                    j = chosen[method]
                    cal[f"sae_{kind}"] = str(calibration.save_feature_calibration(
                        sae_path, feature, kind, points[j].strength, score=summaries[j]["select"]["hm"],
                        source=source))
        result["calibration"] = cal
        for k, v in cal.items():
            _say(f"calibration: {k} -> {v}")
    result["seconds"] = time.monotonic() - t0

    if results_dir is not None:
        out = Path(results_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"eval-{concept.name}-{model_name}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        write_markdown(result, stem.with_suffix(".md"))
        write_plot(result, stem.with_suffix(".png"))
        result["files"] = [str(stem.with_suffix(s)) for s in (".json", ".md", ".png")]
        _say(f"wrote {stem}.{{json,md,png}}")
    return result


# ---- many concepts ----

METHODS = ("none", "prompt", "caa", "sae", "logit")
GOALS = {"caa/prompt": 0.7, "sae/caa": 0.7}  # issue 17: on the mean over concepts, test halves


def summarize_concepts(results: list[dict]) -> dict:
    """Per concept and method, the chosen setting's test-half HM with its interval and dose; the mean over
    concepts per method; the ratios CAA/prompting and SAE/CAA of those means. The intervals of the means and
    ratios are a paired bootstrap: one resample of the test instructions (the same ones for every concept, since
    the concepts share the instruction set) is used for every concept and method, so what they share cancels."""
    test = results[0]["split"]["test"]
    if any(r["split"]["test"] != test for r in results):
        raise ValueError("the concepts' runs must share their instructions and split")
    methods = [m for m in METHODS if all(m in r["chosen"] for r in results)]
    hm = {(r["concept"]["name"], m): [a["hm"] for a in r["points"][r["chosen"][m]]["answers"]]
          for r in results for m in methods}
    names = [r["concept"]["name"] for r in results]

    def mean_of(m, sample):
        return sum(sum(hm[c, m][i] for i in sample) / len(sample) for c in names) / len(names)

    def ratio(a, b):
        return lambda sample: mean_of(a, sample) / max(mean_of(b, sample), 1e-9)

    per_concept = {}
    for r in results:
        per_concept[r["concept"]["name"]] = {m: {k: r["points"][r["chosen"][m]][k] for k in (
            "label", "layer", "strength", "dose", "test", "test_hm_interval")} for m in methods}
        per_concept[r["concept"]["name"]]["feature_note"] = r.get("feature_note")
    mean = {m: {"test_hm": round(mean_of(m, test), 4), "interval": bootstrap_interval(lambda smp, m=m: mean_of(m, smp),
                                                                                        test)} for m in methods}
    ratios = {}
    for name, goal in GOALS.items():
        a, b = name.split("/")
        if a in methods and b in methods:
            ratios[name] = {"value": round(ratio(a, b)(test), 4), "interval": bootstrap_interval(ratio(a, b), test),
                            "goal": goal, "met": ratio(a, b)(test) >= goal}
    return {"concepts": names, "methods": methods, "per_concept": per_concept, "mean": mean, "ratios": ratios}


def write_concepts_markdown(summary: dict, meta: dict, path: Path) -> Path:
    sae_sizes = "at the same multiples of the CAA edit norm" if meta.get("sae_doses") is None else \
        f"at doses {meta['sae_doses']}"
    lines = [f"# Steering quality on {len(summary['concepts'])} concepts: {meta['model_name']}", "",
             f"{meta['date']}, {meta['device']}, dtype {meta['dtype']}; {meta['n_instructions']} instructions "
             f"({meta['n_test']} test), greedy, {meta['max_tokens']} tokens; sweep: CAA at layers {meta['layers']} x "
             f"coefs {meta['coefs']}, SAE feature add {sae_sizes}, logit strengths "
             f"{meta['logit_strengths']}. Each method's setting is chosen on the select half and reported on the test "
             f"half. HM: harmonic mean of the concept, relevance and fluency judges (0-2; sae_steer/evaluate.py). "
             f"Dose: the edit's norm over the mean norm of the unsteered stream at that layer. Intervals: 95% "
             f"bootstrap over the test instructions (paired across concepts and methods for the means and ratios). "
             f"Run time {meta['seconds']:.0f} s.", "",
             "## Per concept (test half)", "",
             "| concept | " + " | ".join(summary["methods"]) + " |", "|---|" + "---|" * len(summary["methods"])]
    for c in summary["concepts"]:
        cells = []
        for m in summary["methods"]:
            e = summary["per_concept"][c][m]
            lo, hi = e["test_hm_interval"]
            where = "" if m in ("none", "prompt") else f" ({e['label'].split(' ', 1)[1]}" + (
                f", dose {e['dose']:.2f})" if e["dose"] is not None else ")")
            cells.append(f"{e['test']['hm']:.3f} [{lo:.2f}, {hi:.2f}]{where}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"**{summary['mean'][m]['test_hm']:.3f}** [{summary['mean'][m]['interval'][0]:.2f}, "
        f"{summary['mean'][m]['interval'][1]:.2f}]" for m in summary["methods"]) + " |")
    lines += ["", "## Goals (mean over concepts, test halves)", "", "| ratio | value | 95% interval | goal | met |",
              "|---|---|---|---|---|"]
    for name, e in summary["ratios"].items():
        lines.append(f"| {name} | {e['value']:.2f} | {e['interval'][0]:.2f}-{e['interval'][1]:.2f} | "
                     f">= {e['goal']} | {'yes' if e['met'] else 'no'} |")
    lines += ["", "## SAE features used", ""]
    lines += [f"- {c}: {summary['per_concept'][c]['feature_note']}" for c in summary["concepts"]]
    lines += ["", "Per concept, every sweep point and example answers: eval-<concept>-<model>.md beside this file.", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_concepts_plot(summary: dict, meta: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed: no plot")
        return None
    groups = summary["concepts"] + ["mean"]
    methods = summary["methods"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        ys, lo, hi = [], [], []
        for c in groups:
            e = summary["mean"][m] if c == "mean" else summary["per_concept"][c][m]
            y = e["test_hm"] if c == "mean" else e["test"]["hm"]
            a, b = e["interval"] if c == "mean" else e["test_hm_interval"]
            ys.append(y), lo.append(y - a), hi.append(b - y)
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=m)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("harmonic mean (0-2), test half")
    ax.set_title(f"Steering quality on {meta['model_name']} ({meta['date']}): chosen settings, 95% bootstrap intervals",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=len(methods))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_eval_concepts(llm, concepts: list[Concept], *, results_dir: str | Path | None = None,
                      vector_out_for=None, **options) -> dict:
    """run_eval for each concept on one engine (each writes its own eval-<concept>-<model>.* and calibration),
    then the summary over concepts (summarize_concepts) -> eval-<model>-<date>.{json,md,png} in results_dir.
    vector_out_for(concept name) -> where that concept's CAA vector goes."""
    t0 = time.monotonic()
    results = []
    for c in concepts:
        _say(f"=== concept {len(results) + 1}/{len(concepts)}: {c.name} ===")
        results.append(run_eval(llm, concept=c, results_dir=results_dir,
                                vector_out=vector_out_for(c.name) if vector_out_for else None, **options))
    summary = summarize_concepts(results)
    r0 = results[0]
    meta = {"model_name": r0["model_name"], "date": r0["date"], "device": r0["device"],
            "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "n_instructions": len(r0["instructions"]), "n_test": len(r0["split"]["test"]),
            "max_tokens": r0["max_tokens"],
            "layers": sorted({p["layer"] for p in r0["points"] if p["method"] == "caa"}),
            "coefs": sorted({p["multiple"] for p in r0["points"] if p["method"] == "caa"}),
            "sae_doses": r0.get("sae_doses"),
            "logit_strengths": [p["strength"] for p in r0["points"] if p["method"] == "logit"],
            "seconds": time.monotonic() - t0}
    out = {"meta": meta, **summary, "files": [f for r in results for f in r.get("files", [])]}
    if results_dir is not None:
        stem = Path(results_dir) / f"eval-{meta['model_name']}-{meta['date']}"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **summary}, indent=1) + "\n", encoding="utf-8")
        write_concepts_markdown(summary, meta, stem.with_suffix(".md"))
        write_concepts_plot(summary, meta, stem.with_suffix(".png"))
        out["files"] += [str(stem.with_suffix(x)) for x in (".json", ".md", ".png")]
        _say(f"wrote {stem}.{{json,md,png}}")
    for name, e in summary["ratios"].items():
        _say(f"{name}: {e['value']:.2f} [{e['interval'][0]:.2f}, {e['interval'][1]:.2f}] (goal >= {e['goal']}: "
             f"{'met' if e['met'] else 'not met'})")
    return out


def default_vector_out(model_name: str, concept: str) -> Path:
    """$XDG_CACHE_HOME/sae-steer/vectors/<model>-<concept>.safetensors (beside fit-sae's SAEs)."""
    from sae_steer.models import cache_dir
    return cache_dir().parent / "vectors" / f"{model_name}-{concept}.safetensors"


def run_eval_command(model: str = "smollm2", *, concept: str = "cold", layers: list[int] | None = None,
                     coefs: list[float] | None = None, sae: str | None = None, logit_strengths: list[float] | None = None,
                     max_tokens: int = 36, n_instructions: int | None = None, results_dir: str | Path = "benchmarks/results",
                     vector_out: str | Path | None = None, calibrate: bool = True, dtype: str | None = None,
                     enforce_eager: bool = True, sae_doses: list[float] | None = None) -> dict:
    """`sae-steer eval`: starts an engine in this process (model, the SAE registered, `layers` steerable) and
    runs run_eval. `model` a known model's name (sae_steer.models: 'smollm2', 'gemma3-270m') or a folder; `sae` a
    folder/file of any supported format; `dtype` the engine's (default: this machine's, sae_steer.machine_dtype)."""
    import os
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from sae_steer.machine_dtype import pick_dtype
    from sae_steer.models import model_name as short_name
    from sae_steer.models import resolve_model
    from sae_steer.vllm_plugin import observers
    path = resolve_model(model)
    model_name = short_name(model)
    dtype = pick_dtype(dtype)
    if layers is None:
        from transformers import AutoConfig
        n = AutoConfig.from_pretrained(path).num_hidden_layers
        layers = sorted({n // 5, n // 3, n // 2})  # SmolLM2 (30 layers): 6, 10, 15
    settings = {"layers": sorted(layers)}
    if sae is not None:
        settings["saes"] = {"eval-sae": str(Path(sae).expanduser())}
    if not os.environ.get(observers.RUNTIME_DIR_ENV):  # the CAA capture's files: a fresh private directory
        import atexit
        import shutil
        import tempfile
        os.environ[observers.RUNTIME_DIR_ENV] = tempfile.mkdtemp(prefix="sae-steer-eval-")
        atexit.register(shutil.rmtree, os.environ[observers.RUNTIME_DIR_ENV], ignore_errors=True)
    instructions = load_instructions()[:n_instructions]
    names = concept_names(concept)
    _say(f"model {path} ({dtype}, {'eager' if enforce_eager else 'compiled'}), steerable layers {settings['layers']}"
         + (f", SAE {sae}" if sae else ", no SAE (CAA, prompting only)"))
    llm = LLM(model=path, dtype=dtype, enforce_eager=enforce_eager, max_model_len=512, seed=0, max_num_seqs=128,
              additional_config={"sae_steer": settings})
    options = dict(instructions=instructions, layers=layers, coefs=coefs or [1.0, 2.0, 4.0],
                   sae_name="eval-sae" if sae else None, sae_path=sae,
                   logit_strengths=logit_strengths if logit_strengths is not None else [2.0, 5.0, 10.0],
                   max_tokens=max_tokens, results_dir=results_dir, calibrate=calibrate, model_name=model_name,
                   sae_doses=sae_doses)
    try:
        if len(names) == 1:
            return run_eval(llm, concept=load_concept(names[0]), **options, vector_out=vector_out if vector_out
                            is not None else default_vector_out(model_name, names[0]))
        if vector_out is not None:
            raise ValueError("--vector-out names one file: give it with one concept only")
        return run_eval_concepts(llm, [load_concept(n) for n in names],
                                 vector_out_for=lambda n: default_vector_out(model_name, n), **options)
    finally:
        llm.llm_engine.engine_core.shutdown()
