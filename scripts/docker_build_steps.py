#!/usr/bin/env python3
"""Run the build steps of docker/Dockerfile.cpu outside Docker, then serve a steered request from the result.

    python3 scripts/docker_build_steps.py [--dockerfile docker/Dockerfile.cpu] [--keep] [--no-smoke]

Each instruction is read from the Dockerfile itself (nothing is copied by hand), in order:
  FROM python:X.Y-slim   a fresh venv made with this machine's Python X.Y (it must match)
  RUN apt-get ...        not run (it would change this machine): the packages must already be installed
  ARG / ENV              environment of the later steps (TORCH_INDEX_URL defaults to pip's own default index,
                         as scripts/setup.sh uses it, where the CPU wheel of torch lies on local disk; set
                         TORCH_INDEX_URL to use another)
  WORKDIR, COPY          under a temporary root (WORKDIR /opt/x -> ROOT/opt/x; COPY from the repository)
  RUN ...                /bin/sh -c, in the WORKDIR, with the venv first on PATH (so `pip` is the image's pip)
  ENTRYPOINT             the smoke test runs it as `docker run IMAGE MODEL ARGS` would, on a tiny model, on
                         127.0.0.1 (not 0.0.0.0) and a free port (not the EXPOSEd one), and checks that a
                         steered completion differs from the unsteered one
About 3 minutes and 3.5 GB (removed at the end unless --keep). Exit status 0 only if every step and the smoke
test passed. tests/docker/test_dockerfiles.py runs it when SAE_STEER_DOCKER_STEPS=1."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Instruction:
    line: int  # 1-based line where it starts
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with backslash continuations joined; comment lines (also inside a continuation) dropped."""
    out, pending, start = [], "", 0
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = (pending + line).strip()
        pending = ""
        cmd, _, args = text.partition(" ")
        out.append(Instruction(start, cmd.upper(), args.strip()))
    return out


def shell_commands(run_args: str) -> list[str]:
    """A RUN line's commands (split at && and ;), each whitespace-normalised."""
    return [" ".join(c.split()) for c in re.split(r"&&|;", run_args) if c.strip()]


def pip_default_index() -> str:
    """The index `pip install` uses when none is given (scripts/setup.sh's case), as pip itself names it."""
    from pip._internal.models.index import PyPI  # noqa: PLC0415 (pip is there: this runs under python3 -m ...)
    return PyPI.simple_url


def log(msg: str) -> None:
    print(f"[docker-steps] {msg}", flush=True)


def run_steps(dockerfile: Path, root: Path) -> tuple[Path, dict, list[str], str]:
    """-> (venv, env, entrypoint argv, exposed port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env.pop("PYTHONPATH", None)
    venv, workdir, entrypoint, exposed = root / "venv", root, [], ""
    for ins in parse_dockerfile(dockerfile):
        t0 = time.time()
        if ins.cmd == "FROM":
            m = re.fullmatch(r"python:(\d+)\.(\d+)(-slim)?", ins.args)
            if not m:
                raise SystemExit(f"line {ins.line}: FROM {ins.args}: only python:X.Y images can be run outside Docker")
            want = (int(m.group(1)), int(m.group(2)))
            python = shutil.which(f"python{want[0]}.{want[1]}") or (sys.executable if sys.version_info[:2] == want else None)
            if python is None:
                raise SystemExit(f"line {ins.line}: the image has Python {want[0]}.{want[1]}; it is not on this machine")
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
            env["VIRTUAL_ENV"] = str(venv)
            log(f"FROM {ins.args}: venv {venv} ({python})")
        elif ins.cmd == "ARG":
            name, _, default = ins.args.partition("=")
            if name in os.environ:
                env[name] = os.environ[name]
            elif name == "TORCH_INDEX_URL":
                env[name] = pip_default_index()
            else:
                env[name] = default
            log(f"ARG {name}={env[name]}")
        elif ins.cmd == "ENV":
            for part in shlex.split(ins.args):
                k, _, v = part.partition("=")
                env[k] = v
            log(f"ENV {ins.args}")
        elif ins.cmd == "WORKDIR":
            workdir = root / ins.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
            log(f"WORKDIR {ins.args} -> {workdir}")
        elif ins.cmd == "COPY":
            *sources, dest = shlex.split(ins.args)
            target = workdir / dest
            for src in sources:
                path = REPO / src
                to = target / path.name if dest.endswith("/") or len(sources) > 1 or target.is_dir() and path.is_file() \
                    else target
                if path.is_dir():
                    shutil.copytree(path, to, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, to)
            log(f"COPY {ins.args}")
        elif ins.cmd == "RUN":
            if ins.args.startswith("apt-get"):
                wanted = [w for w in ins.args.split("install", 1)[1].split("&&")[0].split() if not w.startswith("-")]
                missing = [p for p in wanted if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p],
                                                               capture_output=True, text=True).stdout.find("installed") < 0]
                if missing:
                    raise SystemExit(f"line {ins.line}: the image installs {missing} with apt-get; install them here first")
                log(f"RUN apt-get (not run; {' '.join(wanted)} installed here)")
                continue
            log(f"RUN {ins.args}")
            subprocess.run(["/bin/sh", "-c", ins.args], cwd=workdir, env=env, check=True)
        elif ins.cmd == "ENTRYPOINT":
            entrypoint = json.loads(ins.args)
        elif ins.cmd == "EXPOSE":
            exposed = ins.args.split("/")[0]
        elif ins.cmd in ("LABEL", "CMD", "USER", "HEALTHCHECK"):
            pass
        else:
            raise SystemExit(f"line {ins.line}: {ins.cmd} is not supported outside Docker")
        if ins.cmd in ("FROM", "RUN"):
            log(f"  {time.time() - t0:.0f} s")
    return venv, env, entrypoint, exposed


SMOKE = """
import sys
from pathlib import Path
from sae_steer.formats import save_sae
from sae_steer.tiny_model import build_tiny_llama, random_sae
root = Path(sys.argv[1])
build_tiny_llama(root / "tiny", hidden=128, layers=4)
save_sae(random_sae(128, 256, 1, "relu", seed=0), root / "sae")
"""


def smoke(venv: Path, env: dict, entrypoint: list[str], exposed: str, root: Path) -> None:
    """The image's ENTRYPOINT on a tiny model, on loopback: a steered completion differs from an unsteered one."""
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-c", SMOKE, str(root)], env=env, check=True, cwd=root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The ENTRYPOINT as the image runs it, with `docker run IMAGE MODEL ARGS...` appended; it binds 127.0.0.1
    # instead of 0.0.0.0, and a free port instead of the exposed one.
    argv = [a.replace("0.0.0.0", "127.0.0.1").replace(f"--port {exposed}", f"--port {port}") for a in entrypoint]
    if "--port" in argv and argv[argv.index("--port") + 1] == exposed:  # an exec-form ENTRYPOINT
        argv[argv.index("--port") + 1] = str(port)
    argv += [str(root / "tiny"), "--sae", f"s={root / 'sae'}", "--dtype", "float32", "--max-model-len", "256",
             "--enforce-eager", "--served-model-name", "tiny"]
    assert str(port) in " ".join(argv) and "0.0.0.0" not in " ".join(argv), argv
    log("smoke: " + " ".join(argv))
    senv = {**env, "VLLM_CPU_KVCACHE_SPACE": "1"}  # the image's 4 GiB is for real models
    with open(root / "serve.log", "w") as out:
        proc = subprocess.Popen(argv, env=senv, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"smoke: the server exited ({proc.returncode}):\n{(root / 'serve.log').read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("smoke: the server did not come up in 300 s")
            time.sleep(1)

        def complete(steering=None) -> str:
            body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
            if steering:
                body["steering"] = steering
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["text"]

        plain = complete()
        steered = complete({"interventions": [{"type": "sae", "sae": "s", "feature": 3, "mode": "add",
                                               "strength": 40.0}]})
        log(f"smoke: unsteered {plain!r}, steered {steered!r}")
        if plain == steered:
            raise SystemExit("smoke: the steered completion equals the unsteered one")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log("smoke: ok")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dockerfile", default=str(REPO / "docker" / "Dockerfile.cpu"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary root (venv, copies, logs)")
    ap.add_argument("--no-smoke", action="store_true", help="only the build steps")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="sae-steer-docker-steps-"))
    t0 = time.time()
    try:
        venv, env, entrypoint, exposed = run_steps(Path(args.dockerfile), root)
        if not args.no_smoke:
            smoke(venv, env, entrypoint, exposed, root)
        size = subprocess.run(["du", "-sh", str(venv)], capture_output=True, text=True).stdout.split()[0]
        log(f"done in {time.time() - t0:.0f} s; venv {size}")
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
