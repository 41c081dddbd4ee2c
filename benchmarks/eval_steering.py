"""Steering quality on the embedded SmolLM2-135M-Instruct: `sae-steer eval` over every concept, with this
repository's defaults.

    .venv/bin/python benchmarks/eval_steering.py [--sae DIR] [--no-sae] [any `sae-steer eval` option]

Without --concept it runs every concept of sae_steer/data/concepts.json (cold, joy, food, pirate) on one engine
and writes, into benchmarks/results/, eval-<concept>-smollm2.{json,md,png} per concept and the summary over
concepts eval-smollm2-<date>.{json,md,png} (per concept and method the chosen test-half harmonic mean with its
bootstrap interval and dose, the mean over concepts, the CAA/prompting and SAE/CAA ratios against their goals).
Calibrations go beside the CAA vectors ($XDG_CACHE_HOME/sae-steer/vectors/smollm2-<concept>.safetensors) and
the SAE (<sae>/calibration.json). Without --sae it uses the SAE that `sae-steer fit-sae` writes by default
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
    from sae_steer.models import KNOWN
    argv = list(argv)
    if "--no-sae" in argv:
        argv.remove("--no-sae")
    elif "--sae" not in argv:
        sae = default_out_dir("smollm2", KNOWN["smollm2"].layer, 4096)
        if (sae / "cfg.json").is_file() or any(sae.glob("*.safetensors")):
            argv += ["--sae", str(sae)]
        else:
            print(f"[eval] no fitted SAE at {sae} (run `sae-steer fit-sae`): CAA and prompting only", file=sys.stderr)
    if "--concept" not in argv:
        argv += ["--concept", "all"]
    if "--results" not in argv:
        argv += ["--results", str(HERE / "results")]
    cli(["eval", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
