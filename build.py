"""cffi builder for ``fedpeft_edge._core`` (API / out-of-line mode) from the C sources in csrc/.

setup.py hands ``build.py:ffibuilder`` to cffi; ``python build.py`` also builds in place for quick work.
A compile error fails the build loudly: there is no silent pure-Python fallback at this level (the
numpy backend exists, but only when chosen explicitly with FEDPEFT_EDGE_BACKEND=numpy).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the directory it runs in (the project root).
    return os.path.relpath(path)


HEADER = os.path.join(CSRC, "fedpeft_core.h")

# The cdef is generated from csrc/fedpeft_core.h at build time so the header stays the only copy of
# the API (PyNaCl feeds its binding headers to cdef the same way). cffi's parser is not a C
# preprocessor, so the generator below keeps only what it understands.

# Comments and string/char literals in one pass: literals are kept (a "/*" inside one is not a
# comment), comments become one space as in C translation phase 3.
_COMMENT_OR_LITERAL = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|/\*.*?\*/|//[^\n]*', re.S)
_DIRECTIVE = re.compile(r"#\s*(\w*)\s*(.*)")
_OBJECT_MACRO = re.compile(r"([A-Za-z_]\w*)(?:\s+(.*))?$")  # `NAME value`; `NAME(` is function-like
# cffi's `#define X ...` takes integers only, so only FPE_* macros whose value is an integer constant
# expression become constants; others (the include guard, helper spellings) are C-side details.
_INT_EXPR = re.compile(r"(?:[-+~!*/%&|^<>()\s]|(?:0[xX][0-9A-Fa-f]+|\d+)[uUlL]*)+")
# `#ifdef __cplusplus`, `#ifndef __cplusplus`, `#if defined(__cplusplus)`, `#if !defined __cplusplus`.
_CPLUSPLUS_IF = re.compile(r"(?:ifdef|(ifndef)|if\s*(!?)\s*defined)\s*\(?\s*__cplusplus\s*\)?")
# GCC attributes (e.g. warn_unused_result) mean nothing to cffi and its parser rejects them.
_ATTRIBUTE = re.compile(r"__attribute__\s*\(\((?:[^()]|\([^()]*\))*\)\)")
# cffi parses the C99 `restrict` but not the GNU spellings.
_GNU_RESTRICT = re.compile(r"\b__restrict(?:__)?\b")


def cdef_from_header(path: str = HEADER) -> str:
    """Return the cffi cdef text for the C header at *path*.

    Drops comments and every preprocessor line, skips what C does not see in ``#ifdef __cplusplus``
    blocks (``extern "C" {`` and its ``}``), and turns each integer ``#define FPE_*`` into
    ``#define FPE_* ...`` so cffi reads the value from the real header when it compiles: Python never
    hard-codes a C number. Declarations, typedefs and enums pass through as written.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = text.replace("\\\n", "")  # line splicing comes before comments and directives in C
    text = _COMMENT_OR_LITERAL.sub(lambda m: " " if m.group().startswith("/") else m.group(), text)

    out: list[str] = []
    # One entry per open #if/#ifdef/#ifndef: (seen by C?, tests __cplusplus?). Only __cplusplus is
    # decided; any other condition (the include guard) is taken as true.
    conds: list[tuple[bool, bool]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        directive = _DIRECTIVE.match(line.strip())
        visible = all(seen for seen, _ in conds)
        if directive is None:
            if visible and line.strip():
                out.append(_GNU_RESTRICT.sub("restrict", _ATTRIBUTE.sub("", line)).rstrip())
            continue
        word, rest = directive.group(1), directive.group(2).strip()
        if word in ("if", "ifdef", "ifndef"):
            cpp = _CPLUSPLUS_IF.fullmatch(f"{word} {rest}")
            conds.append((cpp is None or bool(cpp.group(1) or cpp.group(2)), cpp is not None))
        elif word == "else" and conds and conds[-1][1]:
            conds[-1] = (not conds[-1][0], True)
        elif word in ("else", "elif"):
            # Both branches would land in the cdef; refuse rather than guess which one C sees.
            raise ValueError(f"{path}:{lineno}: cffi cdef generator cannot choose a #{word} branch")
        elif word == "endif":
            if not conds:
                raise ValueError(f"{path}:{lineno}: #endif without #if")
            conds.pop()
        elif word == "define" and visible:
            macro = _OBJECT_MACRO.match(rest)
            name, value = (macro.group(1), macro.group(2) or "") if macro else ("", "")
            if name.startswith("FPE_") and _INT_EXPR.fullmatch(value) and re.search(r"\d", value):
                out.append(f"#define {name} ...")
        # Everything else (#include, #undef, #pragma, #error, ...) means nothing to cffi.
    if conds:
        raise ValueError(f"{path}: {len(conds)} unterminated #if")
    return "\n".join(out) + "\n"


SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.c")))
DEPENDS = sorted(glob.glob(os.path.join(CSRC, "*.h")))
if not SOURCES:
    raise RuntimeError(f"fedpeft_edge._core: no C sources found under {CSRC}")

if sys.platform == "win32":
    # MSVC: portable path only (the x86 target attributes need GCC/Clang); strict IEEE float model.
    EXTRA_COMPILE_ARGS = ["/fp:strict", "/W4"]
    LIBRARIES: list[str] = []
else:
    # Appended after Python's own flags (-O3 last wins; we repeat it so a -O2 Python still gets -O3).
    # -ffp-contract=off: no fused multiply-add, so every CPU path and numpy give the same bits.
    # -fno-math-errno: lets sqrtf vectorise; never -ffast-math, never -march=native (run-time
    # dispatch in csrc/dispatch.c picks SSE4.1/AVX2 on the running CPU instead).
    # -Werror: the generated cffi wrapper and our sources are warning-free with GCC 12; a new
    # compiler's new warning fails the build loudly rather than shipping unreviewed code.
    EXTRA_COMPILE_ARGS = [
        "-std=c99",
        "-O3",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-ffp-contract=off",
        "-fno-math-errno",
        # Only PyInit__core needs exporting; keeps fpe_* symbols from clashing with other modules.
        "-fvisibility=hidden",
    ]
    LIBRARIES = ["m"]
    if platform.machine().lower() in ("i386", "i486", "i586", "i686", "x86"):
        # 32-bit x86 defaults to x87 maths, whose 80-bit intermediates act like a fused multiply-add and
        # break bit-parity (see `make -C csrc test-i686-x87`); SSE2 scalar maths keeps it. Needs a
        # Pentium 4 or newer, which every supported gateway is.
        EXTRA_COMPILE_ARGS += ["-msse2", "-mfpmath=sse"]

ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header())
ffibuilder.set_source(
    "fedpeft_edge._core",
    '#include "fedpeft_core.h"\n',
    sources=[_rel(p) for p in SOURCES],
    depends=[_rel(p) for p in DEPENDS],
    include_dirs=[_rel(CSRC)],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    libraries=LIBRARIES,
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=HERE, verbose=True)
