"""The SAE's training corpus: everyday English written by the served model itself, generated once.

Why the model's own answers: the SAE has to know the concepts people steer toward (weather and seasons,
emotions, food, places, animals, work, ...), and an instruct model's answers to a broad instruction set
cover them in plain English, on the very distribution the SAE is later used on (chat answers), with no
download, no model hub and no root: the text comes from the model that is already installed. The model's
licence (SmolLM2: Apache-2.0) carries over to its outputs. Generating it takes minutes even on a fast CPU,
so it is done once with `sae-steer make-corpus` and shipped as a compressed data file
(sae_steer/data/corpus-smollm2.jsonl.gz) whose first line records its provenance.

    instruction_set(n, seed)   templated instructions: TOPICS (subjects of everyday life) x TEMPLATES (kinds
                               of text: story, description, letter, tips, poem, explanation, dialogue, ...),
                               a deterministic sample
    make_corpus(llm, ...)      the answers (chat template, sampled, one seed per instruction)
    write_corpus / read_corpus the jsonl.gz file: a {"provenance": ...} header line, then one
                               {"instruction", "text", "tokens"} object a line
"""
from __future__ import annotations

import ast
import gzip
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
CHUNK_CHARS = 1200
HELD_OUT_EVERY = 20
LOCAL_EVERY = 10  # one licence/docstring chunk after every 10 model-written texts in the training corpus

# Subjects of everyday life, grouped by topic; the eval's concepts (sae_steer/data/concepts.json) are among them.
TOPICS: dict[str, list[str]] = {
    "winter and cold weather": ["a snowy winter morning", "a cold winter night", "a blizzard in the mountains",
                                "ice skating on a frozen lake", "building a snowman",
                                "staying warm in freezing weather"],
    "summer and hot weather": ["a hot summer afternoon", "a heatwave in the city", "a sunny day at the park",
                               "summer holidays"],
    "rain, storms and seasons": ["a rainy autumn day", "a thunderstorm at night", "the first day of spring",
                                 "falling autumn leaves", "the changing seasons"],
    "joy and happiness": ["the happiest day of your life", "a joyful celebration", "laughing with friends",
                          "good news that makes you smile", "what makes people happy"],
    "anger and frustration": ["a day when everything goes wrong", "an angry customer", "losing your temper",
                              "calming down when you are furious"],
    "sadness and fear": ["saying goodbye to a friend", "a rainy lonely evening", "being afraid of the dark",
                         "feeling nervous before an exam"],
    "love and friendship": ["a best friend", "falling in love", "a kind neighbour", "a family reunion"],
    "food and cooking": ["baking bread at home", "a family dinner", "a favourite recipe", "cooking pasta",
                         "a delicious breakfast", "fresh vegetables from the market", "a chocolate cake",
                         "a spicy soup"],
    "the ocean and the beach": ["a day at the beach", "sailing on the ocean", "the waves and the tide",
                                "fish and whales in the sea", "a lighthouse on the coast"],
    "cities and places": ["a busy city street", "a quiet village", "a visit to Paris", "a market square",
                          "an old library"],
    "nature and the outdoors": ["a walk in the forest", "climbing a mountain", "a garden in bloom",
                                "a river in the valley", "camping under the stars"],
    "animals and pets": ["a playful puppy", "a cat that sleeps all day", "birds in the morning",
                         "horses on a farm", "wild animals in the jungle"],
    "work and jobs": ["the first day at a new job", "a busy day at the office", "working from home",
                      "a meeting with the boss", "a nurse at the hospital"],
    "school and learning": ["learning a new language", "a favourite teacher", "studying for a test",
                            "the first day of school"],
    "travel and transport": ["a long train journey", "a flight to another country", "a road trip with friends",
                             "getting lost in a new town"],
    "sports and games": ["a football match", "running a marathon", "a game of chess", "swimming lessons"],
    "music and art": ["learning to play the guitar", "a concert in the park", "painting a picture",
                      "a favourite song"],
    "home and family": ["cleaning the house", "a cosy living room", "a grandmother's stories",
                        "moving to a new home"],
    "health and the body": ["a good night's sleep", "catching a cold", "eating healthy food", "a morning workout"],
    "money and shopping": ["saving money", "shopping for clothes", "a birthday present", "a small shop"],
    "technology": ["a new smartphone", "how computers help us", "the internet", "robots in the future"],
    "history and science": ["the ancient pyramids", "the moon and the stars", "how plants grow",
                            "a famous inventor"],
    "pirates and adventure": ["a pirate ship", "buried treasure on an island", "a sea captain and his crew"],
    "holidays and celebrations": ["a birthday party", "a wedding", "a new year's eve", "a summer festival"],
}

TEMPLATES: list[str] = [
    "Write a short story about {s}.",
    "Describe {s}.",
    "Write a letter to a friend about {s}.",
    "Give three tips about {s}.",
    "Write a short poem about {s}.",
    "Explain {s} to a child.",
    "Write a diary entry about {s}.",
    "What do you like about {s}?",
    "Write a short dialogue between two people about {s}.",
    "Tell me a fun fact about {s}.",
    "Write a paragraph about {s} in the voice of a pirate.",
    "Write a formal announcement about {s}.",
    "Describe {s} using all five senses.",
    "Write a news report about {s}.",
]


def _say(msg: str) -> None:
    print(f"[make-corpus] {msg}", file=sys.stderr, flush=True)


# ---- text every machine has: licences and docstrings (the minority of the training corpus) ----

def _licences() -> list[tuple[str, str]]:
    seen, out = set(), []
    for p in sorted(Path("/usr/share/common-licenses").glob("*")):
        real = p.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            out.append((str(p), real.read_text(errors="ignore")))
    return out


def _stdlib_docstrings() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__phello__"}
    out = []
    for path in sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.append((f"{path.relative_to(root)}:{getattr(node, 'name', '<module>')}", doc))
    return out


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Paragraphs packed into chunks of at most `size` characters (a longer paragraph is cut)."""
    out, cur = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        while len(para) > size:
            if cur:
                out.append(cur)
                cur = ""
            out.append(para[:size])
            para = para[size:]
        if cur and len(cur) + 2 + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return [c for c in out if len(c) > 40]


def _held_out(texts: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): every HELD_OUT_EVERY-th text is held out."""
    held = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held


def local_corpus() -> tuple[list[str], list[str]]:
    """(train chunks, held-out chunks): licences, then stdlib docstrings; every HELD_OUT_EVERY-th is held out."""
    return _held_out([c for _, text in _licences() + _stdlib_docstrings() for c in chunks(text)])


def training_corpus(model: str, corpus_file: str | Path | None = None) -> tuple[list[str], list[str], dict]:
    """fit-sae's corpus: (train texts, held-out texts, what it is, for the SAE's metrics). The model-written
    answers of `corpus_file` (default: the model's own, sae_steer/data/corpus-<model>.jsonl.gz, else SmolLM2's:
    English written by another model is still English), each cut into chunks of at most CHUNK_CHARS, with one
    licence/docstring chunk (local_corpus) after every LOCAL_EVERY of them; every HELD_OUT_EVERY-th held out."""
    path = Path(corpus_file) if corpus_file is not None else default_corpus_path(model)
    if corpus_file is None and not path.is_file():
        path = DATA / "corpus-smollm2.jsonl.gz"
    provenance, rows = read_corpus(path)
    written = [c for r in rows for c in chunks(r["text"])]
    local_train, local_held = local_corpus()
    local = iter(local_train + local_held)
    mixed = []
    for i, text in enumerate(written):
        mixed.append(text)
        if i % LOCAL_EVERY == LOCAL_EVERY - 1:
            mixed.append(next(local, None))
    mixed = [t for t in mixed if t is not None]
    train, held = _held_out(mixed)
    about = {"file": path.name, "provenance": provenance, "texts": len(mixed),
             "mix": f"answers written by {provenance.get('model')} (sae_steer.corpus), one licence/stdlib-docstring "
                    f"chunk after every {LOCAL_EVERY}; chunks of <= {CHUNK_CHARS} chars; every {HELD_OUT_EVERY}th "
                    f"held out"}
    return train, held, about


def instruction_set(n: int | None = None, seed: int = 0) -> list[str]:
    """Every subject x template (or a deterministic sample of n of them), shuffled with `seed`."""
    everything = [t.format(s=s) for subjects in TOPICS.values() for s in subjects for t in TEMPLATES]
    rng = random.Random(seed)
    rng.shuffle(everything)
    return everything if n is None else everything[:n]


def make_corpus(llm, instructions: list[str], *, max_tokens: int = 192, temperature: float = 0.7, seed: int = 0,
                batch: int = 64, done: list[dict] | None = None, on_batch=None, progress: bool = True) -> list[dict]:
    """The engine's answers to `instructions` (chat template; sampled with seed + i for instruction i, so a
    rerun on the same engine and dtype gives the same text), in order, `batch` requests in flight at a time.
    `done`: rows of an interrupted run (the first len(done) instructions), kept; `on_batch(rows)` after each batch."""
    from vllm import SamplingParams

    rows = list(done or [])
    if [r["instruction"] for r in rows] != instructions[:len(rows)]:
        raise ValueError("the rows of the interrupted run are not answers to the first instructions of this set")
    from sae_steer.evaluate import render
    tok = llm.get_tokenizer()
    new_tokens, start = 0, time.monotonic()
    for b in range(len(rows), len(instructions), batch):
        chunk = instructions[b:b + batch]
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=0.95, seed=seed + b + i)
                  for i in range(len(chunk))]
        results = llm.generate([{"prompt_token_ids": render(tok, ins)} for ins in chunk], params, use_tqdm=False)
        for ins, res in zip(chunk, results):
            out = res.outputs[0]
            rows.append({"instruction": ins, "text": out.text.strip(), "tokens": len(out.token_ids)})
            new_tokens += len(out.token_ids)
        if on_batch is not None:
            on_batch(rows)
        if progress:
            elapsed = time.monotonic() - start
            _say(f"{len(rows)}/{len(instructions)} answers, {sum(r['tokens'] for r in rows)} tokens; "
                 f"{new_tokens / max(elapsed, 1e-9):.0f} tok/s, {elapsed:.0f} s")
    return rows


def write_corpus(rows: list[dict], path: str | Path, provenance: dict) -> Path:
    """A jsonl.gz file: {"provenance": ...} first, then the rows (no name or mtime in the gzip header: the same
    rows, the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.write((json.dumps({"provenance": provenance}) + "\n").encode())
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    tmp.replace(path)
    return path


def read_corpus(path: str | Path) -> tuple[dict, list[dict]]:
    """(provenance, rows) of a corpus file written by write_corpus."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or "provenance" not in lines[0]:
        raise ValueError(f"{path}: the first line must be a {{'provenance': ...}} object")
    return lines[0]["provenance"], lines[1:]


def default_corpus_path(model: str) -> Path:
    """sae_steer/data/corpus-<model>.jsonl.gz: where make-corpus writes and fit-sae reads a model's corpus."""
    from sae_steer.models import model_name
    return DATA / f"corpus-{model_name(model)}.jsonl.gz"


def run_make_corpus(model: str = "smollm2", out: str | Path | None = None, *, n: int | None = None,
                    max_tokens: int = 192, seed: int = 0, dtype: str | None = None, enforce_eager: bool = True) -> Path:
    """`sae-steer make-corpus`: start an engine, answer the instruction set, write the file with its provenance.
    `dtype`: the engine's (default: this machine's, sae_steer.machine_dtype)."""
    import os
    import platform
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from sae_steer.machine_dtype import pick_dtype
    from sae_steer.models import known, resolve_model
    path = resolve_model(model)
    dtype = pick_dtype(dtype)
    out = Path(out) if out is not None else default_corpus_path(model)
    instructions = instruction_set(n, seed)
    _say(f"model {path} ({dtype}): {len(instructions)} instructions, up to {max_tokens} tokens each")
    # an interrupted run resumes: its answers so far are kept in <out>.partial (plain jsonl), removed at the end
    partial = Path(str(out) + ".partial")
    done = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()] if partial.is_file() else []
    if done:
        _say(f"resuming: {len(done)} answers in {partial}")

    def keep(rows: list[dict]) -> None:
        tmp = partial.with_name(partial.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(partial)

    t0 = time.monotonic()
    if len(done) >= len(instructions):  # an earlier run got this far: no engine needed
        rows = done[:len(instructions)]
        if [r["instruction"] for r in rows] != instructions:
            raise ValueError(f"{partial} holds answers to other instructions than this set's")
    else:
        llm = LLM(model=path, dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_tokens + 128, seed=seed,
                  max_num_seqs=64)
        try:
            rows = make_corpus(llm, instructions, max_tokens=max_tokens, seed=seed, done=done, on_batch=keep)
        finally:
            llm.llm_engine.engine_core.shutdown()
    entry = known(model)
    provenance = {
        "model": entry.folder if entry else Path(path).name,
        "licence": f"{entry.licence} (the licence of {entry.folder}, which wrote it)" if entry
        else "that of the model that wrote it",
        "command": f"sae-steer make-corpus --model {model} --max-tokens {max_tokens} --seed {seed}"
                   + (f" --instructions {n}" if n else "") + f" --dtype {dtype}",
        "date": time.strftime("%Y-%m-%d"), "seed": seed, "dtype": dtype, "temperature": 0.7, "top_p": 0.95,
        "instructions": f"sae_steer.corpus.instruction_set: {len(TOPICS)} topics x {len(TEMPLATES)} templates",
        "n_rows": len(rows), "n_tokens": sum(r["tokens"] for r in rows),
        "seconds": round(time.monotonic() - t0, 1), "machine": platform.processor() or platform.machine()}
    written = write_corpus(rows, out, provenance)
    partial.unlink(missing_ok=True)
    _say(f"wrote {written} ({written.stat().st_size / 1e3:.0f} kB): {provenance['n_rows']} answers, "
         f"{provenance['n_tokens']} tokens in {provenance['seconds']:.0f} s")
    return written
