"""Steering quality on the embedded SmolLM2-135M-Instruct: `sae-steer eval` with this repository's defaults.

    .venv/bin/python benchmarks/eval_steering.py [--sae DIR] [--no-sae] [any `sae-steer eval` option]

Writes benchmarks/results/eval-<concept>-smollm2.{json,md,png} and the calibration beside the CAA vector
($XDG_CACHE_HOME/sae-steer/vectors/smollm2-<concept>.safetensors.calibration.json) and the SAE
(<sae>/calibration.json). Without --sae it uses the SAE that `sae-steer fit-sae` writes by default
($XDG_CACHE_HOME/sae-steer/saes/SmolLM2-135M-Instruct-L15-4096) when it exists, and says so when it does not
(CAA, prompting only). See sae_steer/evaluate.py for the sweep and the judges.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> None:
    from sae_steer.cli import main as cli
    from sae_steer.fit_sae import default_out_dir
    argv = list(argv)
    if "--no-sae" in argv:
        argv.remove("--no-sae")
    elif "--sae" not in argv:
        sae = default_out_dir("smollm2", 15, 4096)
        if (sae / "cfg.json").is_file() or any(sae.glob("*.safetensors")):
            argv += ["--sae", str(sae)]
        else:
            print(f"[eval] no fitted SAE at {sae} (run `sae-steer fit-sae`): CAA and prompting only", file=sys.stderr)
    if "--results" not in argv:
        argv += ["--results", str(HERE / "results")]
    cli(["eval", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
