"""The package's rooms and which may import which (the picture in docs/architecture.md, enforced).

1. A static check: every module of ``fedpeft_edge/`` is parsed with ``ast``; every import in it (module
   level or inside functions, ``import fedpeft_edge.x``, ``from fedpeft_edge import x``, relative forms,
   ``importlib.import_module("fedpeft_edge.x")`` with a literal name) is mapped to the room it lands in
   and checked against :data:`ALLOWED`. ``if TYPE_CHECKING:`` imports count too: the rule is about design.
2. Isolation in fresh interpreters: what a device imports loads nothing of the central side (nor torch),
   the aggregator loads nothing of the site, and ``fedpeft-edge --help`` does not import numpy.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = "fedpeft_edge"
REPO = Path(__file__).resolve().parents[1]
PKG_DIR = REPO / PKG

# Rooms below ``fedpeft_edge/`` (one per sub-package), plus three pseudo-rooms:
#   "package" = ``fedpeft_edge/__init__.py`` (runs before any submodule, so it must import nothing of ours),
#   "main"    = ``fedpeft_edge/__main__.py`` (``python -m fedpeft_edge``),
#   "core"    = the C extension ``fedpeft_edge._core`` (only kernels may call it).
# A room may always import itself and "package" (``import fedpeft_edge`` for ``__version__``).
LOWER_THAN_PROTOCOL = {"runtime", "kernels", "data", "peft", "training"}
ALLOWED: dict[str, set[str]] = {
    "runtime": set(),
    "kernels": {"runtime", "core"},
    "data": {"runtime", "kernels"},
    "peft": {"runtime", "kernels", "data"},
    "training": {"runtime", "kernels", "data", "peft"},
    "models": {"runtime", "kernels", "data", "peft", "training"},
    "protocol": {"runtime", "kernels", "data"},
    "bundle": {"runtime", "kernels", "data", "peft"},
    "site": LOWER_THAN_PROTOCOL | {"protocol", "bundle"},
    "central": LOWER_THAN_PROTOCOL | {"models", "protocol", "bundle"},
    # The operator console (central side, a web face of its own): it follows the broker, never the core.
    "console": {"runtime", "protocol"},
    # The gateway tier (a line's aggregator at the plant): the central core over the plant broker.
    "gateway": {"runtime", "kernels", "protocol", "central"},
    "faces": LOWER_THAN_PROTOCOL | {"models", "protocol", "bundle", "site", "central", "console", "gateway"},
    "package": set(),
    "main": {"faces"},
}
# Arrows of ALLOWED that only the listed modules may use (today).
NARROWED: dict[tuple[str, str], set[str]] = {
    ("protocol", "data"): {f"{PKG}.protocol.config"},
}
ROOM_DIRS = sorted(r for r in ALLOWED if r not in ("package", "main"))


def room_of(module: str) -> str | None:
    """The room of a dotted module (or attribute) name; None when it is not ours."""
    parts = module.split(".")
    if parts[0] != PKG:
        return None
    if len(parts) == 1:
        return "package"
    head = parts[1]
    if head in ALLOWED and head not in ("package", "main"):
        return head
    if head == "_core":
        return "core"
    if head == "__main__":
        return "main"
    if (PKG_DIR / head).is_dir() or (PKG_DIR / f"{head}.py").is_file():
        return f"<unplaced:{head}>"  # a new top-level module or package: give it a room in ALLOWED
    return "package"  # an attribute of fedpeft_edge/__init__.py, e.g. __version__


def _imported_names(module: str, is_package: bool, tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, dotted target)`` for every import of ours in ``tree``."""
    own_package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package[: len(own_package) - (node.level - 1)] if node.level > 1 else own_package
                if node.level - 1 > len(own_package) - 1:
                    found.append((node.lineno, f"<relative import beyond {PKG}>"))
                    continue
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PKG or (node.level and not node.module):
                # ``from fedpeft_edge import site`` / ``from . import wire``: each name may be a module.
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return [(line, t) for line, t in found if t.startswith("<") or room_of(t) is not None]


def check_source(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """Forbidden imports of one module, as ``"module:line -> target (room A may not import room B)"``."""
    room = room_of(module)
    if room is None or room not in ALLOWED:
        return [f"{module}: not in any room (add its room to ALLOWED in tests/test_layers.py)"]
    problems = []
    for line, target in _imported_names(module, is_package, ast.parse(source, filename=module)):
        if target.startswith("<"):
            problems.append(f"{module}:{line} -> {target}")
            continue
        to = room_of(target)
        if to in (room, "package"):
            continue
        if to not in ALLOWED[room]:
            problems.append(f"{module}:{line} -> {target} (room {room} may not import room {to})")
        elif (room, to) in NARROWED and module not in NARROWED[(room, to)]:
            only = ", ".join(sorted(NARROWED[(room, to)]))
            problems.append(f"{module}:{line} -> {target} (room {room} may import room {to} only in {only})")
    return problems


def package_modules() -> list[tuple[str, Path, bool]]:
    """``(dotted name, path, is_package)`` of every Python module under fedpeft_edge/."""
    out = []
    for path in sorted(PKG_DIR.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        if "__pycache__" in rel.parts:
            continue
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out.append((".".join(parts), path, is_package))
    return out


# ---- static check ------------------------------------------------------------------------------------

def test_every_subpackage_has_a_room():
    subpackages = sorted(p.name for p in PKG_DIR.iterdir()
                         if p.is_dir() and p.name != "__pycache__" and any(p.rglob("*.py")))
    assert subpackages == ROOM_DIRS, "every sub-package of fedpeft_edge/ needs a room in ALLOWED, and back"


def test_no_room_imports_a_room_it_may_not():
    problems: list[str] = []
    modules = package_modules()
    assert len(modules) > 20, "found suspiciously few modules; is REPO right?"
    for name, path, is_package in modules:
        try:
            problems += check_source(name, path.read_text(encoding="utf-8"), is_package=is_package)
        except SyntaxError as exc:
            problems.append(f"{name}: cannot be parsed ({exc})")
    assert not problems, "imports across rooms that docs/architecture.md forbids:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize(("module", "source", "forbidden"), [
    (f"{PKG}.site.fake", "def f():\n    from fedpeft_edge.central import core\n", "central"),
    (f"{PKG}.site.fake", "from fedpeft_edge import models\n", "models"),
    (f"{PKG}.site.fake", "from ..central.core import AggregatorCore\n", "central"),
    (f"{PKG}.protocol.fake", "import fedpeft_edge.faces.cli\n", "faces"),
    (f"{PKG}.protocol", "from . import wire\nfrom ..site import agent\n", "site"),
    (f"{PKG}.runtime.fake", "import importlib\nimportlib.import_module('fedpeft_edge.kernels')\n", "kernels"),
    (f"{PKG}.central.fake", "from fedpeft_edge._core import lib\n", "core"),
    (f"{PKG}.protocol.codec", "from fedpeft_edge.data.text import TextEncoder\n", "data"),  # NARROWED
])
def test_checker_catches_forbidden_imports(module, source, forbidden):
    problems = check_source(module, source, is_package=module.count(".") == 1)
    assert len(problems) == 1 and f"import room {forbidden}" in problems[0], problems


def test_checker_passes_allowed_imports():
    source = ("import numpy as np\nimport fedpeft_edge\nfrom fedpeft_edge import kernels, __version__\n"
              "from . import encoder\nfrom ..protocol.codec import encode_vector\n"
              "def f():\n    from fedpeft_edge.training.base import LocalTrainer\n")
    assert check_source(f"{PKG}.site.agent", source) == []
    assert check_source(f"{PKG}.protocol.config", "from fedpeft_edge.data.local_files import x\n") == []


def _defines(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


@pytest.mark.parametrize("room", ROOM_DIRS)
def test_room_init_names_its_job_and_public_names(room):
    """Each room's ``__init__`` has a docstring and an ``__all__`` whose names all exist (statically)."""
    init = PKG_DIR / room / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{init} has no docstring saying the room's job"
    exported = None
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            defined |= names
            if "__all__" in names:
                exported = ast.literal_eval(node.value)
            if "_LAZY" in names:  # PEP 562 lazy names: each must be defined by the submodule it names
                for name, module in ast.literal_eval(node.value).items():
                    source = (PKG_DIR / room / f"{module}.py").read_text(encoding="utf-8")
                    assert _defines(ast.parse(source), name), f"{room}.{module} does not define {name}"
                    defined.add(name)
    assert exported, f"{init} has no __all__"
    submodules = {p.stem for p in (PKG_DIR / room).glob("*.py")} | {
        p.name for p in (PKG_DIR / room).iterdir() if (p / "__init__.py").is_file()}
    missing = [n for n in exported if n not in defined and n not in submodules]
    assert not missing, f"{room}.__all__ names what neither the __init__ nor a submodule defines: {missing}"


# ---- isolation in fresh interpreters -----------------------------------------------------------------

def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def _loaded_after(imports: list[str], prefixes: tuple[str, ...]) -> list[str]:
    code = (f"import sys, json\nimport {', '.join(imports)}\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {{'torch'}} "
            f"or m.startswith({prefixes!r}))))\n")
    proc = _run(code)
    assert proc.returncode == 0, f"importing {imports} failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_site_loads_nothing_of_central_or_models_nor_torch():
    mods = [f"{PKG}.site.agent", f"{PKG}.site.trainer_setup", f"{PKG}.site.encoder"]
    loaded = _loaded_after(mods, (f"{PKG}.central", f"{PKG}.models", "torch"))
    assert loaded == [], f"a site process imported {loaded}"


def test_central_loads_nothing_of_site():
    mods = [f"{PKG}.central.{m}" for m in ("service", "core", "store", "strategy", "accumulator")]
    loaded = [m for m in _loaded_after(mods, (f"{PKG}.site",)) if m.startswith(f"{PKG}.site")]
    assert loaded == [], f"the aggregator imported {loaded}"


# Records who imports numpy first: a meta-path finder that notes the stack and lets the import go on.
_WHO_IMPORTS_NUMPY = """
import json, sys, traceback
class Spy:
    chain = None
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and Spy.chain is None:
            Spy.chain = [f"{f.filename[f.filename.rfind('fedpeft_edge/'):]}:{f.lineno}"
                         for f in traceback.extract_stack() if "fedpeft_edge/" in f.filename]
        return None
sys.meta_path.insert(0, Spy())
import contextlib, io
from fedpeft_edge.faces import cli
parser = cli.build_parser()
for args in [["--help"]] + [[name, "--help"] for name in cli.COMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        parser.parse_args(args)
print(json.dumps({"numpy": "numpy" in sys.modules, "chain": Spy.chain, "commands": sorted(cli.COMMANDS)}))
"""


def test_cli_parser_and_every_help_do_not_import_numpy():
    proc = _run(_WHO_IMPORTS_NUMPY)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["commands"], "no sub-commands registered"
    assert not result["numpy"], "building the CLI parser imported numpy, first via (outermost first):\n  " \
        + "\n  ".join(result["chain"] or ["<outside fedpeft_edge>"])


def importers(importtime_log: str, module: str) -> list[str]:
    """From ``-X importtime`` output: ``module`` and the chain of modules that imported it."""
    rows = []
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1]
            rows.append((len(name) - len(name.lstrip()), name.strip()))
    for i, (depth, name) in enumerate(rows):
        if name == module:
            chain = [name]
            for d, parent in rows[i + 1:]:  # a parent is printed after its children, one level up
                if d < depth:
                    chain.append(parent)
                    depth = d
            return chain
    return []


def test_python_m_fedpeft_edge_help_does_not_import_numpy():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", PKG, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout
    chain = importers(proc.stderr, "numpy")
    assert not chain, "python -m fedpeft_edge --help imported numpy: " + " <- ".join(chain)
