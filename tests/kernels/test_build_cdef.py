"""The cffi cdef is generated from csrc/fedpeft_core.h by build.py; check it against the header and the
built extension (fedpeft_edge._core), so a header edit cannot silently drop or add a binding."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import cffi
import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "fedpeft_core.h"

# Parsed here independently of build.py's generator: comments out, then every `fpe_name(`.
_C_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_HEADER_FUNC = re.compile(r"\b(fpe_\w+)\s*\(")
_HEADER_CONST = re.compile(r"^\s*#\s*define\s+(FPE_\w+)\s+(-?\d+)\s*$", re.M)
_CDEF_CONST = re.compile(r"#define (\w+) \.\.\.")
_CDEF_FUNC = re.compile(r"\b(\w+)\s*\(")


def _header_code() -> str:
    return _C_COMMENT.sub(" ", HEADER.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def build_module() -> ModuleType:
    """build.py loaded by path; importing it must set up ffibuilder without compiling anything."""
    spec = importlib.util.spec_from_file_location("fedpeft_build_under_test", ROOT / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)

    def no_compile(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("importing build.py must not compile")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cffi.FFI, "compile", no_compile)
        mp.setattr(cffi.FFI, "emit_c_code", no_compile)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cdef(build_module: ModuleType) -> str:
    return build_module.cdef_from_header(str(HEADER))


@pytest.fixture(scope="module")
def lib() -> object:
    core = pytest.importorskip("fedpeft_edge._core", reason="C extension not built")
    return core.lib


def test_cdef_declares_every_header_function(cdef: str) -> None:
    header_funcs = set(_HEADER_FUNC.findall(_header_code()))
    assert header_funcs, "no fpe_* declarations found in the header"
    assert header_funcs <= set(_CDEF_FUNC.findall(cdef))


def test_cdef_has_no_preprocessor_lines_except_cffi_constants(cdef: str) -> None:
    # `#define NAME ...` is cffi syntax (value read from the header at build time), not a C directive.
    hash_lines = [line for line in cdef.splitlines() if line.lstrip().startswith("#")]
    assert all(_CDEF_CONST.fullmatch(line) for line in hash_lines), hash_lines


def test_cdef_constants_are_the_header_constants(cdef: str) -> None:
    assert set(_CDEF_CONST.findall(cdef)) == {name for name, _ in _HEADER_CONST.findall(_header_code())}


def test_every_cdef_name_exists_on_the_built_lib(cdef: str, lib: object) -> None:
    names = set(_CDEF_CONST.findall(cdef)) | set(_CDEF_FUNC.findall(cdef))
    assert names, "cdef declares nothing"
    missing = sorted(name for name in names if not hasattr(lib, name))
    assert not missing, f"stale extension? rebuild with pip install -e . ; missing: {missing}"


def test_built_constants_equal_the_header_values(lib: object) -> None:
    # The cdef says `...`: the values must come from the compiled header, not from Python.
    for name, value in _HEADER_CONST.findall(_header_code()):
        assert getattr(lib, name) == int(value), name


def test_generator_handles_cplusplus_guards_attributes_and_continuations(
    build_module: ModuleType, tmp_path: Path
) -> None:
    header = tmp_path / "h.h"
    header.write_text(
        "#ifndef H_H\n#define H_H\n#include <stddef.h>\n"
        '#ifdef __cplusplus\nextern "C" {\n#endif\n'
        "#define FPE_FLAG (1u << 3) /* a flag */\n"
        "#define FPE_MAX(a, b) \\\n    ((a) > (b) ? (a) : (b))\n"
        "#define HELPER 7\n"
        "int fpe_f(float *__restrict x, /* split\n   comment */ size_t n) __attribute__((nonnull(1)));\n"
        "#ifdef __cplusplus\n}\n#endif\n#endif\n",
        encoding="utf-8",
    )
    text = build_module.cdef_from_header(str(header))
    assert text.splitlines()[0] == "#define FPE_FLAG ..."
    assert "extern" not in text and "}" not in text and "__attribute__" not in text
    assert "HELPER" not in text and "FPE_MAX" not in text
    cffi.FFI().cdef(text)  # cffi's parser accepts the result


def test_generator_refuses_an_else_branch_it_cannot_decide(build_module: ModuleType, tmp_path: Path) -> None:
    header = tmp_path / "h.h"
    header.write_text("#ifdef FOO\nint fpe_a(void);\n#else\nint fpe_b(void);\n#endif\n", encoding="utf-8")
    with pytest.raises(ValueError, match="#else"):
        build_module.cdef_from_header(str(header))
