"""Torch-free access to ONNX Runtime Training (the one place that imports it).

``import onnxruntime.training`` runs a package ``__init__`` that imports ``optim`` (torch helpers) and,
through ``artifacts``, ``onnxruntime.tools`` whose ``__init__`` imports torch whenever torch happens to be
installed. A device must never need torch, so we register bare package modules for
``onnxruntime.training`` and ``onnxruntime.tools`` (real ``__path__``, ``__init__`` not run) and an empty
``onnxruntime.training.optim``. Submodules (``api``, ``artifacts``, ``onnxblock``) then import normally.

``import onnxruntime`` itself probes ``onnxruntime.training.ortmodule`` (a torch front end) while it
validates the build; we register that name as absent so the probe fails fast instead of importing torch.
This only works when it happens before the first ``import onnxruntime`` of the process, so code in this
package gets onnxruntime through :func:`ort` (or imports this module first).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from types import ModuleType

from fedpeft_edge.runtime.errors import MissingDependencyError

# The training build is central-only ([prepare] extra); a device has the stock build (base install).
_TRAINING_HINT = (
    "the training API is central-only: pip install 'fedpeft-edge[prepare]', then "
    "pip install --force-reinstall --no-deps onnxruntime-training-cpu==1.19.2"
)


def _bare_package(name: str, directory: Path) -> None:
    """Register ``name`` as a package whose submodules load from ``directory`` without its __init__."""
    if name in sys.modules:
        return
    module = types.ModuleType(name)
    module.__path__ = [str(directory)]
    module.__package__ = name
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def _register_bare_packages() -> None:
    """Runs at import of this module: must precede the process's first ``import onnxruntime``."""
    if "onnxruntime" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return  # reported with an install hint when the API is first requested
    root = Path(spec.origin).parent
    _bare_package("onnxruntime.training", root / "training")
    _bare_package("onnxruntime.tools", root / "tools")
    # None in sys.modules makes `import onnxruntime.training.ortmodule` raise ImportError at once.
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]
    sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))


_register_bare_packages()


def ort() -> ModuleType:
    """The ``onnxruntime`` module (InferenceSession, OrtValue...), imported without torch."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("onnxruntime is missing: pip install onnxruntime") from exc
    return onnxruntime


def runtime_build() -> str:
    """``"training"`` when the importable onnxruntime is the training build, ``"stock"`` otherwise.

    Read from the files, without importing onnxruntime, so that it is safe before the shim's first import.
    """
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("onnxruntime is missing: pip install onnxruntime")
    return "training" if (Path(spec.origin).parent / "training" / "api").is_dir() else "stock"


def runtime_label() -> str:
    """What runs the graphs, for reports and bench JSON: ``"onnxruntime 1.32.0"`` or
    ``"onnxruntime-training 1.19.2"``."""
    name = "onnxruntime-training" if runtime_build() == "training" else "onnxruntime"
    return f"{name} {ort().__version__}"


def _prepare() -> None:
    onnxruntime = ort()
    root = Path(onnxruntime.__file__).parent
    if not (root / "training" / "api").is_dir():
        raise MissingDependencyError(
            f"the installed onnxruntime {onnxruntime.__version__} is the stock build, without the training "
            f"API; {_TRAINING_HINT}"
        )
    _bare_package("onnxruntime.training", root / "training")
    _bare_package("onnxruntime.tools", root / "tools")
    if "onnxruntime.training.optim" not in sys.modules:
        sys.modules["onnxruntime.training.optim"] = types.ModuleType("onnxruntime.training.optim")


def training_api() -> ModuleType:
    """``onnxruntime.training.api`` (Module, CheckpointState, Optimizer) without torch."""
    _prepare()
    return importlib.import_module("onnxruntime.training.api")


def training_artifacts() -> ModuleType:
    """``onnxruntime.training.artifacts`` (offline artifact generation) without torch."""
    _prepare()
    return importlib.import_module("onnxruntime.training.artifacts")


def onnxblock() -> ModuleType:
    _prepare()
    return importlib.import_module("onnxruntime.training.onnxblock")
