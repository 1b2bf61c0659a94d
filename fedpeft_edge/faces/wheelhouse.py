"""``fedpeft-edge wheelhouse``: every wheel a device needs, for an offline install without a compiler.

Central side, from a checkout of this project. The folder gets:

* this project's wheel with the C core ``fedpeft_edge._core`` already compiled for the target platform and
  Python: built by ``pip wheel --no-deps`` with the host compiler when the target is the host's platform,
  or cross-compiled (``<arch>-linux-gnu-gcc`` against the target Python's headers, the cffi C source made
  by build.py) and packed into the host-built wheel in place of the host's extension, then re-tagged
  ``cpXY-cpXY-linux_<arch>``;
* the wheels of the ``[project]`` base dependencies only (stock onnxruntime; never torch, never
  onnxruntime-training), by ``pip download --only-binary=:all:`` for the target's platform and Python; a
  dependency published only as a source archive is built into a wheel on the host and kept only when it
  is pure Python;
* ``README.txt`` (the install command) and ``manifest.json`` (every file with its sha256).

On the device: ``pip install --no-index --find-links DIR fedpeft-edge``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime.durable import file_sha256 as _sha256
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError

PLATFORMS = ("x86_64", "aarch64")
_ELF_MACHINE = {"x86_64": 62, "aarch64": 183}
# What `pip wheel` needs from a checkout (the rest, tests and docs, stays out of the build copy).
_SOURCE_FILES = ("pyproject.toml", "setup.py", "build.py", "README.md")
_SOURCE_DIRS = ("csrc", "fedpeft_edge")
_NEVER = re.compile(r"^(torch|onnxruntime[-_]training.*)$", re.I)
ARM64_ROOT_DEFAULT = "/var/tmp/fedpeft-arm64-root"  # scripts/arm64_gateway.sh's cached root
INSTALL_COMMAND = "pip install --no-index --find-links {dir} fedpeft-edge"


@dataclass
class WheelhouseOptions:
    platform: str
    python: str  # "3.11"
    out: Path
    source: Path | None = None  # a checkout of this project (default: the one this module is in)
    cc: str | None = None  # cross compiler (default <arch>-linux-gnu-gcc)
    python_include: Path | None = None  # the target Python's include dir (Python.h, pyconfig.h)
    glibc: str = "2.28"  # newest manylinux glibc the device has (Debian 10+ has 2.28)
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)


def _run(cmd: Sequence[str], what: str, *, cwd: Path | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise FedPeftError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _py_tag(version: str) -> str:
    major, minor = version.split(".")
    return f"cp{major}{minor}"


def find_source(source: Path | None) -> Path:
    candidates = [source] if source is not None else [Path(__file__).resolve().parents[2], Path.cwd()]
    for c in candidates:
        if c is not None and all((c / f).is_file() for f in _SOURCE_FILES) and (c / "csrc").is_dir():
            return c.resolve()
    where = ", ".join(str(c) for c in candidates if c is not None)
    raise InvalidValueError(f"no checkout of fedpeft_edge (pyproject.toml, build.py, csrc/) at {where}; "
                            "run from the project folder or pass --source")


def _copy_source(src: Path, dst: Path) -> Path:
    """A clean copy to build from: no in-tree build/ or compiled extension, and no race with anyone else
    building in the checkout at the same time."""
    dst.mkdir(parents=True)
    for name in _SOURCE_FILES:
        shutil.copy2(src / name, dst / name)
    for p in sorted(src.glob("LICENSE*")):
        shutil.copy2(p, dst / p.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.pyc", "*.pyd")
    for name in _SOURCE_DIRS:
        shutil.copytree(src / name, dst / name, ignore=ignore)
    return dst


def base_dependencies(source: Path) -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml (the base install a device gets)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(source / "pyproject.toml", "rb") as fh:
        deps = list(tomllib.load(fh)["project"]["dependencies"])
    for d in deps:
        name = re.split(r"[\s<>=!~;\[(]", d, maxsplit=1)[0]
        if _NEVER.match(name):
            raise InvalidValueError(f"{name} is a base dependency; a device must never get it")
    return deps


# ---- the project's wheel -------------------------------------------------------------------------------
def _find_python(version: str) -> str:
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    found = shutil.which(f"python{version}")
    if found is None:
        raise InvalidValueError(f"building for Python {version} on this host needs a python{version} "
                                "interpreter on PATH (this one is "
                                f"{sys.version_info.major}.{sys.version_info.minor})")
    return found


def _elf_machine(data: bytes) -> int:
    if data[:4] != b"\x7fELF":
        raise InvalidValueError("the compiled extension is not an ELF file")
    return struct.unpack("<H", data[18:20])[0]


def _extension_members(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as zf:
        return [n for n in zf.namelist() if re.fullmatch(r"fedpeft_edge/_core\.[^/]*so", n)]


def build_host_wheel(src: Path, python: str, work: Path) -> Path:
    """``pip wheel --no-deps`` of the source copy with ``python`` (host compiler, host platform)."""
    out = work / "host-wheel"
    _run([python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
         f"building the project wheel with {python}")
    wheels = sorted(out.glob("fedpeft_edge-*.whl"))
    if len(wheels) != 1:
        raise FedPeftError(f"pip wheel made {len(wheels)} project wheels in {out}")
    return wheels[0]


def _real_config(config: Path) -> bool:
    """False for Debian's multiarch wrapper pyconfig.h (it only includes the per-architecture one)."""
    return "-linux-gnu/python" not in config.read_text(errors="replace")


def find_target_headers(arch: str, version: str, explicit: Path | None) -> tuple[Path, Path]:
    """(dir with Python.h, the target's own pyconfig.h) for Python ``version`` on ``arch``: from
    ``explicit``, the host's multiarch headers, or (aarch64) the arm64 root of scripts/arm64_gateway.sh."""
    multiarch = f"{arch}-linux-gnu"
    pkg = f"libpython{version}-dev:{'arm64' if arch == 'aarch64' else arch}"
    places: list[tuple[str, Path, list[Path]]] = []
    if explicit is not None:
        places.append(("--python-include", explicit,
                       [explicit / "pyconfig.h", explicit.parent / multiarch / explicit.name / "pyconfig.h"]))
    places.append((f"the host's {pkg}", Path(f"/usr/include/python{version}"),
                   [Path(f"/usr/include/{multiarch}/python{version}/pyconfig.h")]))
    if arch == "aarch64":
        root = Path(os.environ.get("FEDPEFT_ARM64_ROOT", ARM64_ROOT_DEFAULT))
        places.append((f"the arm64 root of scripts/arm64_gateway.sh ({root})",
                       root / "usr" / "include" / f"python{version}",
                       [root / "usr" / "include" / multiarch / f"python{version}" / "pyconfig.h"]))
    tried = []
    for label, inc, configs in places:
        config = next((c for c in configs if c.is_file() and _real_config(c)), None)
        if (inc / "Python.h").is_file() and config is not None:
            return inc, config
        tried.append(f"{label}: {inc} + {configs[-1]}")
    raise InvalidValueError(
        f"no {arch} headers of Python {version} found, so the C core cannot be cross-compiled. Tried:\n  "
        + "\n  ".join(tried) + f"\nInstall them (dpkg --add-architecture arm64 && apt-get install {pkg}), "
        "pass --python-include DIR, or build the arm64 root once with "
        "FEDPEFT_ARM64_STAGE=root sudo bash scripts/arm64_gateway.sh")


def _check_header_version(inc: Path, version: str) -> None:
    text = (inc / "patchlevel.h").read_text(errors="replace")
    found = ".".join(re.search(rf"#define\s+PY_{k}_VERSION\s+(\d+)", text).group(1)  # type: ignore[union-attr]
                     for k in ("MAJOR", "MINOR"))
    if found != version:
        raise InvalidValueError(f"{inc} holds the headers of Python {found}, not {version}")


def cross_compile_core(src: Path, arch: str, version: str, cc: str, inc: Path, config: Path, work: Path
                       ) -> Path:
    """Compile ``fedpeft_edge/_core.abi3.so`` for ``arch`` with ``cc`` (the C source from build.py's cffi
    builder, compile flags from build.py)."""
    if shutil.which(cc) is None:
        cross = "arm64" if arch == "aarch64" else arch
        raise InvalidValueError(f"cross compiler {cc} not found (Debian: apt-get install "
                                f"gcc-{arch}-linux-gnu libc6-dev-{cross}-cross), or pass --cc")
    _check_header_version(inc, version)
    build_dir = work / f"cross-{arch}"
    headers = build_dir / "include"
    # Python.h includes "pyconfig.h" from its own folder: a private copy with the target's pyconfig.h
    # (Debian's multiarch wrapper would pull the *host's* one for another architecture).
    shutil.copytree(inc, headers)
    shutil.copy2(config, headers / "pyconfig.h")
    spec = importlib.util.spec_from_file_location("_fedpeft_build", src / "build.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    cwd = os.getcwd()
    try:
        os.chdir(src)  # build.py names its sources relative to the working directory
        spec.loader.exec_module(builder)
        builder.ffibuilder.emit_c_code(str(build_dir / "_core.c"))
    finally:
        os.chdir(cwd)
    flags = ["-fPIC", "-DNDEBUG", "-fwrapv", *builder.EXTRA_COMPILE_ARGS]
    objects = []
    for c_file in [build_dir / "_core.c", *sorted((src / "csrc").glob("*.c"))]:
        obj = build_dir / (c_file.stem + ".o")
        _run([cc, *flags, "-I", str(headers), "-I", str(src / "csrc"), "-c", str(c_file), "-o", str(obj)],
             f"compiling {c_file.name} for {arch}")
        objects.append(str(obj))
    so = build_dir / "_core.abi3.so"
    _run([cc, "-shared", "-o", str(so), *objects, *(f"-l{lib}" for lib in builder.LIBRARIES)],
         f"linking the C core for {arch}")
    if _elf_machine(so.read_bytes()[:64]) != _ELF_MACHINE[arch]:
        raise FedPeftError(f"{so} was not built for {arch}")
    return so


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def retag_wheel(whl: Path, out_dir: Path, tag: str, replace: dict[str, bytes] | None = None) -> Path:
    """A copy of ``whl`` with its WHEEL tag set to ``tag`` (one tag), members in ``replace`` swapped, the
    RECORD rewritten, and the file named by the new tag."""
    replace = dict(replace or {})
    name, version = whl.name.split("-")[:2]
    target = out_dir / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(whl) as zin:
        members = [(i, zin.read(i.filename)) for i in zin.infolist()]
    record_name = next(i.filename for i, _ in members if i.filename.endswith(".dist-info/RECORD"))
    rows = []
    tmp = target.with_suffix(".whl.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in members:
            if info.filename == record_name:
                continue
            if info.filename in replace:
                data = replace.pop(info.filename)
            if info.filename.endswith(".dist-info/WHEEL"):
                lines = [ln for ln in data.decode().splitlines() if not ln.startswith("Tag:")]
                data = ("\n".join([*lines, f"Tag: {tag}"]) + "\n").encode()
            zout.writestr(info, data)
            rows.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        rows.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(rows) + "\n")
    if replace:
        raise FedPeftError(f"{whl.name} has no member(s) {sorted(replace)}")
    os.replace(tmp, target)
    return target


def project_wheel(opts: WheelhouseOptions, src: Path, work: Path) -> Path:
    """The project's wheel for (platform, python) in ``opts.out``, its extension checked."""
    arch, tag_py = opts.platform, _py_tag(opts.python)
    tag = f"{tag_py}-{tag_py}-linux_{arch}"
    for old in opts.out.glob("fedpeft_edge-*.whl"):
        old.unlink()
    if arch == _host_arch():
        opts.log(f"building the project wheel for {arch} / Python {opts.python} with the host compiler")
        host = build_host_wheel(src, _find_python(opts.python), work)
        with zipfile.ZipFile(host) as zf:
            tags = [ln[4:].strip() for ln in zf.read(next(n for n in zf.namelist()
                                                          if n.endswith(".dist-info/WHEEL"))).decode()
                    .splitlines() if ln.startswith("Tag:")]
        if tags != [tag]:
            raise FedPeftError(f"the host build is tagged {tags}, expected {tag}")
        whl = Path(shutil.copy2(host, opts.out / host.name))
    else:
        cc = opts.cc or f"{arch}-linux-gnu-gcc"
        inc, config = find_target_headers(arch, opts.python, opts.python_include)
        opts.log(f"cross-compiling the C core for {arch} / Python {opts.python} with {cc} "
                 f"(headers {inc}, {config})")
        so = cross_compile_core(src, arch, opts.python, cc, inc, config, work)
        host = build_host_wheel(src, sys.executable, work)  # the pure-Python files and metadata
        members = _extension_members(host)
        if len(members) != 1:
            raise FedPeftError(f"the host wheel holds {members} instead of one C core")
        whl = retag_wheel(host, opts.out, tag, {members[0]: so.read_bytes()})
        opts.notes.append(f"C core cross-compiled with {cc} against {config}")
    members = _extension_members(whl)
    with zipfile.ZipFile(whl) as zf:
        machines = {_elf_machine(zf.read(m)[:64]) for m in members}
    if len(members) != 1 or machines != {_ELF_MACHINE[arch]}:
        raise FedPeftError(f"{whl.name}: C core {members} is not one {arch} extension")
    return whl


# ---- the dependencies ------------------------------------------------------------------------------
def _platform_tags(arch: str, glibc: str) -> list[str]:
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise InvalidValueError(f"--glibc {glibc}: manylinux wheels need glibc 2.17 or newer")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]
    return [*tags, "any"]


def download_dependencies(opts: WheelhouseOptions, deps: list[str]) -> None:
    """``pip download`` of ``deps`` as wheels for the target into ``opts.out`` (sdist-only pure-Python
    packages are built into wheels on the host)."""
    py = opts.python
    args = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", py,
            "--implementation", "cp", "--abi", _py_tag(py), "--abi", "abi3", "--abi", "none",
            *[a for t in _platform_tags(opts.platform, opts.glibc) for a in ("--platform", t)],
            "--find-links", str(opts.out), "-d", str(opts.out), *deps]
    built: set[str] = set()
    for _ in range(8):
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        missing = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", proc.stderr)
        if missing is None or missing.group(1) in built:
            raise FedPeftError("pip download of the dependencies failed:\n"
                               + "\n".join(proc.stderr.strip().splitlines()[-20:]))
        name = missing.group(1)
        built.add(name)
        opts.log(f"no {opts.platform} wheel of {name}: building one from its source archive on the host")
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, name],
                 f"building a wheel of {name}")
            wheels = list(Path(tmp).glob("*.whl"))
            if not wheels or not all(w.name.endswith("-none-any.whl") for w in wheels):
                raise FedPeftError(f"{name} has no {opts.platform} wheel and is not pure Python: it would "
                                   "need compiling on the device")
            for w in wheels:
                shutil.copy2(w, opts.out / w.name)
                opts.notes.append(f"{w.name} built from its source archive (pure Python)")
    raise FedPeftError("pip download kept failing")


# ---- the whole folder ----------------------------------------------------------------------------------


def build_wheelhouse(opts: WheelhouseOptions) -> dict[str, Any]:
    if opts.platform not in PLATFORMS:
        raise InvalidValueError(f"--platform must be one of {PLATFORMS}, got {opts.platform!r}")
    if not re.fullmatch(r"3\.\d{1,2}", opts.python):
        raise InvalidValueError(f"--python must look like 3.11, got {opts.python!r}")
    src = find_source(opts.source)
    deps = base_dependencies(src)
    opts.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpeft-wheelhouse-") as tmp:
        work = Path(tmp)
        copy = _copy_source(src, work / "src")
        whl = project_wheel(opts, copy, work)
    opts.log(f"project wheel: {whl.name}")
    opts.log(f"downloading {len(deps)} base dependencies (and theirs) for {opts.platform} / "
             f"Python {opts.python}")
    download_dependencies(opts, deps)
    files = sorted(p for p in opts.out.iterdir() if p.is_file() and p.suffix == ".whl")
    forbidden = [p.name for p in files if _NEVER.match(p.name.split("-")[0])]
    if forbidden:
        raise FedPeftError(f"{opts.out} holds wheels a device must never get: {forbidden}")
    non_wheels = [p.name for p in opts.out.iterdir() if p.is_file() and p.suffix in (".gz", ".zip", ".bz2")]
    if non_wheels:
        raise FedPeftError(f"{opts.out} holds source archives (would need a compiler): {non_wheels}")
    manifest = {
        "platform": opts.platform, "python": opts.python, "glibc": opts.glibc, "project_wheel": whl.name,
        "install": INSTALL_COMMAND.format(dir="<this folder>"), "dependencies": deps,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "notes": opts.notes,
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (opts.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in files)
    readme = f"""fedpeft-edge offline wheelhouse: {opts.platform}, CPython {opts.python}, glibc {opts.glibc}+

Install on the device (no network, no compiler needed: the C core is prebuilt in {whl.name}):

    python{opts.python} -m venv /opt/fedpeft/venv
    /opt/fedpeft/venv/bin/pip install --no-index --find-links /path/to/{opts.out.name} fedpeft-edge

Then check it:  /opt/fedpeft/venv/bin/fedpeft-edge bench --skip-training

{len(files)} wheels, {total / 1e6:.1f} MB; sha256 of every file in manifest.json.
Base dependencies only: stock onnxruntime (no onnxruntime-training), no torch.
"""
    (opts.out / "README.txt").write_text(readme)
    opts.log(f"wheelhouse {opts.out}: {len(files)} wheels, {total / 1e6:.1f} MB in "
             f"{time.perf_counter() - t0:.0f} s")
    return manifest


__all__ = ["PLATFORMS", "WheelhouseOptions", "build_wheelhouse", "retag_wheel"]
