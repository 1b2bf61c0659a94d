"""The trained model, used on site: each new global becomes a merged inference model in ``<state>/model``.

Layout (``ModelStore``)::

    model/
      current -> 12       which version ``fedpeft-edge infer`` runs (a symlink, or a one-line file
                          where the filesystem has none); swapped atomically
      pinned              present after ``model rollback``: new versions are kept but not made current
      12/                 one folder per global round, complete or absent (built in .tmp-*, renamed)
        model.onnx        the eval graph with the global applied, LoRA folded in (peft.merge), logits out
        model.data        its tensors (external data)
        tokenizer.json    text models: the tokenizer, copied, so nobody re-implements tokenisation
        deploy.json       version, round, labels, inputs, preprocessing (max_len, or image size/mean/std)
      11/  10/            the previous versions (the newest ``keep``, 3 by default, plus the current)

The export reads only what the site has: its gradient model folder (eval graph + ``base.data``) and its
``[data] options`` (tokenizer / image settings). Called by the agent once per new global through
:func:`export_global`, which logs and swallows every failure: exporting never stops training.
Personalised sites are not a case yet (no personalisation state exists on a site); when one is added,
the export of the *global* stays what this module writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.runtime.durable import atomic_file, fsync_dir
from fedpeft_edge.runtime.durable import file_sha256 as _file_sha256
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # <state_dir>/model
CURRENT = "current"
PINNED = "pinned"
DEPLOY = "deploy.json"
DEPLOY_FORMAT = 1
TOKENIZER = "tokenizer.json"
KEEP = 3
_TMP, _OLD = ".tmp-", ".old-"


# ---- the versioned store ------------------------------------------------------------------------------
class ModelStore:
    """Versions of the deployed model under ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str, *, keep: int = KEEP) -> None:
        if keep < 1:
            raise InvalidValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def path(self, version: int) -> Path:
        return self.root / str(int(version))

    def versions(self) -> list[int]:
        """Complete versions (a folder named by its round with a deploy.json), oldest first by export
        time: a long-running agent joins new federations whose rounds start again at 0."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.name.isdigit() and p.is_dir() and (p / DEPLOY).is_file():
                try:
                    created = float(read_deploy(p).get("created", 0.0))
                except (FedPeftError, TypeError, ValueError):
                    created = (p / DEPLOY).stat().st_mtime
                found.append((created, int(p.name)))
        return [v for _, v in sorted(found)]

    def current(self) -> int | None:
        pointer = self.root / CURRENT
        try:
            name = os.readlink(pointer) if pointer.is_symlink() else pointer.read_text().strip()
        except OSError:
            return None
        name = Path(name).name
        if not name.isdigit() or not (self.path(int(name)) / DEPLOY).is_file():
            return None
        return int(name)

    @property
    def pinned(self) -> bool:
        return (self.root / PINNED).exists()

    def set_current(self, version: int) -> None:
        """Point ``current`` at ``version`` atomically (symlink swap; a pointer file where none exist)."""
        if not (self.path(version) / DEPLOY).is_file():
            raise InvalidValueError(f"model version {version} is not in {self.root}")
        pointer = self.root / CURRENT
        tmp = self.root / f"{_TMP}{CURRENT}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.symlink(str(int(version)), tmp)
            os.replace(tmp, pointer)
        except OSError:  # no symlinks here (some FAT/SMB mounts): a one-line pointer file
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            with atomic_file(pointer, "w", encoding="utf-8") as fh:
                fh.write(f"{int(version)}\n")
        fsync_dir(self.root)

    def rollback(self) -> int:
        """Make the version before the current one current and pin it (new globals then stay aside)."""
        cur = self.current()
        versions = self.versions()
        if cur is None:
            raise InvalidValueError(f"{self.root} has no current model version")
        older = versions[: versions.index(cur)] if cur in versions else []
        if not older:
            raise InvalidValueError(
                f"no version exported before {cur} is kept in {self.root} (kept, oldest first: {versions})"
            )
        self.pin(older[-1])
        return older[-1]

    def pin(self, version: int) -> None:
        self.set_current(version)
        with atomic_file(self.root / PINNED, "w", encoding="utf-8") as fh:
            fh.write(f"{int(version)}\n")

    def follow_latest(self) -> int:
        """Unpin and make the newest version current (undoes a rollback)."""
        versions = self.versions()
        if not versions:
            raise InvalidValueError(f"{self.root} holds no model version")
        with contextlib.suppress(FileNotFoundError):
            (self.root / PINNED).unlink()
        self.set_current(versions[-1])
        return versions[-1]

    def deploy_info(self, version: int) -> dict[str, Any]:
        return read_deploy(self.path(version))

    def publish(
        self,
        version: int,
        write: Callable[[Path], dict[str, Any]],
        same: Callable[[dict[str, Any]], bool] | None = None,
    ) -> Path:
        """Build version ``version`` with ``write(tmp_dir) -> deploy record`` and make it visible atomically.

        ``deploy.json`` is written last into the temp folder, everything is fsynced, the folder is renamed
        into place, then ``current`` moves (unless pinned) and old versions are pruned. An exception (or a
        crash) anywhere before the rename leaves the store as it was; a leftover temp folder is removed by
        the next publish. ``same(existing_record)`` true: the version is already there, nothing is built.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        final = self.path(version)
        if same is not None and (final / DEPLOY).is_file():
            with contextlib.suppress(FedPeftError):
                if same(read_deploy(final)):
                    self._point_and_prune(version)
                    return final
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{int(version)}-", dir=self.root))
        try:
            record = write(tmp)
            record = {**record, "format": DEPLOY_FORMAT, "version": int(version)}
            with atomic_file(tmp / DEPLOY, "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=1, sort_keys=True)
            fsync_dir(tmp)
            if final.exists():  # the same round again with other content (a new federation): replace it
                old = Path(tempfile.mkdtemp(prefix=f"{_OLD}{int(version)}-", dir=self.root))
                os.replace(final, old / "x")
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._point_and_prune(version)
        return final

    def _point_and_prune(self, version: int) -> None:
        if self.pinned and self.current() is not None:
            log.info(
                "model version %d kept; current stays at %s (pinned by a rollback; "
                "`fedpeft-edge model latest` follows new versions again)",
                version,
                self.current(),
            )
        else:
            self.set_current(version)
        self.prune()

    def prune(self) -> list[int]:
        """Remove all but the newest ``keep`` versions; the current one is always kept."""
        versions = self.versions()
        cur = self.current()
        drop = [v for v in versions[: -self.keep] if v != cur]
        for v in drop:
            # renamed first so a reader never sees a half-deleted version
            doomed = self.root / f"{_OLD}{v}-{os.getpid()}"
            with contextlib.suppress(OSError):
                os.replace(self.path(v), doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        return drop

    def _remove_leftovers(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith((_TMP, _OLD)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()


def read_deploy(version_dir: Path) -> dict[str, Any]:
    path = Path(version_dir) / DEPLOY
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidValueError(f"unreadable model record {path}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != DEPLOY_FORMAT:
        raise InvalidValueError(f"{path}: not a deploy record of format {DEPLOY_FORMAT}")
    return record


# ---- the export --------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def preprocessing_from_options(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a reader needs to turn raw inputs into model inputs, from ``[data] options`` (a
    ``prepared_dir`` or inline keys, as the trainer setup reads them); None when they do not say."""
    from fedpeft_edge.site.trainer_setup import _model_meta

    meta, kind = _model_meta(options)
    if kind == "text" and "tokenizer_json" in meta:
        return {
            "kind": "text",
            "tokenizer_json": str(meta["tokenizer_json"]),
            "max_len": int(meta.get("max_len", 64)),
        }  # type: ignore[arg-type]
    if kind == "image" and all(k in meta for k in ("image_size", "mean", "std")):
        return {
            "kind": "image",
            "image_size": int(meta["image_size"]),  # type: ignore[arg-type]
            "mean": [float(x) for x in meta["mean"]],  # type: ignore[attr-defined]
            "std": [float(x) for x in meta["std"]],  # type: ignore[attr-defined]
            "channels": int(meta.get("channels", 3)),
        }  # type: ignore[arg-type]
    return None


def export_version(
    store: ModelStore,
    gradient_model: Any,
    flat: np.ndarray,
    version: int,
    *,
    labels: Sequence[str],
    preprocessing: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write version ``version`` of the merged inference model into ``store`` (atomically; see publish)."""
    from fedpeft_edge.peft.merge import export_from_gradient_model

    flat = np.ascontiguousarray(flat, dtype=np.float32)
    global_sha = hashlib.sha256(flat.tobytes()).hexdigest()
    spec_hash = gradient_model.spec_hash

    def same(record: dict[str, Any]) -> bool:
        return record.get("global_sha256") == global_sha and record.get("spec_hash") == spec_hash

    def write(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        info = export_from_gradient_model(gradient_model, flat, tmp)
        pre: dict[str, Any] | None = None
        if preprocessing is not None:
            pre = dict(preprocessing)
            if pre.get("kind") == "text":
                shutil.copyfile(pre.pop("tokenizer_json"), tmp / TOKENIZER)
                _fsync_file(tmp / TOKENIZER)
                pre["tokenizer"] = TOKENIZER
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": _file_sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        return {
            "round": int(version),
            "created": time.time(),
            "spec_hash": spec_hash,
            "method": info["method"],
            "merged": info["merged"],
            "lora_weights_folded": info["lora_weights_folded"],
            "model": info["model"],
            "inputs": {n: gradient_model.input_dtypes.get(n, "float32") for n in info["inputs"]},
            "output": info["output"],
            "labels": list(labels),
            "preprocessing": pre,
            "global_sha256": global_sha,
            "files": files,
            "export_seconds": time.perf_counter() - t0,
            **dict(extra or {}),
        }

    return store.publish(version, write, same)


@dataclass
class _AgentExport:
    """Per-agent export settings, worked out on the first global."""

    store: ModelStore
    model: Any  # GradientModel
    labels: list[str]
    preprocessing: dict[str, Any] | None


def _label_names(cfg: Any, head: int | None, gradient_dir: Path) -> list[str]:
    d = cfg.data
    if d.classes:
        return list(d.classes)
    # a site bundle (site/bundle_setup.py) extracts its gradient model into <bundle>/gradient/ beside
    # the manifest that names the labels
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        manifest = json.loads((gradient_dir.parent / "manifest.json").read_text(encoding="utf-8"))
        labels = manifest.get("labels")
        if manifest.get("format") == "fedpeft-edge-site-bundle" and isinstance(labels, list) and labels:
            return [str(x) for x in labels]
    if d.dataset:
        with contextlib.suppress(Exception):  # the names are a nicety; ids still work without them
            from fedpeft_edge.data.datasets import load_dataset

            classes = list(load_dataset(d.dataset, d.split).classes)
            if head is None or len(classes) == head:
                return classes
    return [f"class_{i}" for i in range(int(head or 0))]


def _setup(agent: Any) -> _AgentExport | None:
    model = getattr(agent.trainer, "bundle", None)
    if model is None or not hasattr(model, "base_data") or not hasattr(model, "eval_outputs"):
        log.info(
            "model export off: the trainer (%s) has no gradient model folder", type(agent.trainer).__name__
        )
        return None
    pre = preprocessing_from_options(agent.cfg.data.options)
    if pre is None:
        log.warning(
            "exported models will carry no preprocessing: [data] options name neither a "
            "prepared_dir nor tokenizer_json/max_len or image_size/mean/std"
        )
    return _AgentExport(
        ModelStore(Path(agent.state_dir) / MODEL_DIR),
        model,
        _label_names(agent.cfg, model.spec.head_classes, Path(model.directory)),
        pre,
    )


def export_global(agent: Any, g: Any) -> Path | None:
    """Export the merged inference model of global ``g`` for ``agent`` (an EdgeAgent); never raises."""
    try:
        setup = agent.__dict__.get("_model_export", ...)
        if setup is ...:
            setup = agent.__dict__["_model_export"] = _setup(agent)
        if setup is None:
            return None
        if g.spec_hash != setup.model.spec_hash:
            log.warning(
                "model export skipped for round %d: the global's spec hash differs from the gradient model's",
                g.round,
            )
            return None
        from fedpeft_edge.protocol.codec import decode_global

        t0 = time.perf_counter()
        flat = decode_global(g.vector, int(setup.model.num_trainable))
        personal = getattr(agent, "personal", None)
        if personal is not None:
            flat = personal.start_from(flat)  # the site's own values of its private tensors (FedPer)
        rank_cut = getattr(agent, "rank_cut", None)
        if rank_cut is not None:
            flat = rank_cut.start_from(flat)  # the model this site trained: the global cut to its rank
        path = export_in_child(
            setup,
            flat,
            int(g.round),
            extra={"fleet": g.fleet, "site": agent.client_id, "final": bool(g.meta.get("final", False))},
        )
        log.info(
            "model version %d exported to %s in %.2f s (current: %s)",
            g.round,
            path,
            time.perf_counter() - t0,
            setup.store.current(),
        )
        return path
    except Exception:  # never let the export stop training
        log.exception("model export for round %s failed; training goes on", getattr(g, "round", "?"))
        return None


EXPORT_TIMEOUT_S = 900.0


def export_in_child(setup: _AgentExport, flat: np.ndarray, version: int, *, extra: Mapping[str, Any]) -> Path:
    """:func:`export_version` in a short-lived child process.

    Why: merging reads the base and onnx (about 90 MB for MiniLM) on top of the trainer's sessions; in a
    child that memory is the child's and is returned to the system when it exits, so the agent process
    keeps the trainer's footprint (bench/RESULTS.md, agent peak RSS). A crash of the child cannot take
    the agent with it either.
    """
    import subprocess
    import sys

    setup.store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=setup.store.root, prefix=".job-") as tmp:
        vector = Path(tmp) / "global.npy"
        np.save(vector, np.ascontiguousarray(flat, dtype=np.float32), allow_pickle=False)
        job = {
            "store": str(setup.store.root),
            "keep": setup.store.keep,
            "gradient_dir": str(setup.model.directory),
            "vector": str(vector),
            "version": int(version),
            "labels": list(setup.labels),
            "preprocessing": setup.preprocessing,
            "extra": dict(extra),
        }
        (Path(tmp) / "job.json").write_text(json.dumps(job), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "fedpeft_edge.site.model_export", str(Path(tmp) / "job.json")],
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT_S,
        )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FedPeftError(f"the export process exited with {done.returncode}: {tail[0]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _export_job(job_file: str) -> None:
    """The child's side of :func:`export_in_child`: prints the version folder it wrote."""
    from fedpeft_edge.peft.lowering.model import GradientModel

    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    flat = np.load(job["vector"], allow_pickle=False)
    path = export_version(
        ModelStore(job["store"], keep=int(job["keep"])),
        GradientModel.load(job["gradient_dir"]),
        flat,
        int(job["version"]),
        labels=job["labels"],
        preprocessing=job["preprocessing"],
        extra=job["extra"],
    )
    print(path, flush=True)


# ---- the reading side: batch inference on stock onnxruntime ------------------------------------------
class DeployedModel:
    """One version of the store, ready to predict: session, labels and preprocessing from deploy.json."""

    def __init__(self, version_dir: Path | str, *, threads: int = 1) -> None:
        from fedpeft_edge.runtime.ort_import import ort

        self.directory = Path(version_dir)
        self.record = read_deploy(self.directory)
        self.version = int(self.record["version"])
        self.labels: list[str] = list(self.record["labels"])
        self.preprocessing: dict[str, Any] | None = self.record.get("preprocessing")
        rt = ort()
        options = rt.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.log_severity_level = 3
        self.session = rt.InferenceSession(
            str(self.directory / self.record["model"]), options, providers=["CPUExecutionProvider"]
        )
        self.input_dtypes = {k: np.dtype(v) for k, v in self.record["inputs"].items()}
        self._encoder: Any = None

    @classmethod
    def current(cls, root: Path | str, *, threads: int = 1) -> DeployedModel:
        """The current version of a store (``root`` = ``<state>/model``); a version folder works too."""
        root = Path(root)
        if (root / DEPLOY).is_file():
            return cls(root, threads=threads)
        store = ModelStore(root)
        cur = store.current()
        if cur is None:
            raise InvalidValueError(f"{root} has no current model version (versions: {store.versions()})")
        return cls(store.path(cur), threads=threads)

    def logits(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=dt) for n, dt in self.input_dtypes.items()}
        return np.asarray(self.session.run([self.record["output"]], feeds)[0], dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        pre = self.preprocessing or {}
        if pre.get("kind") != "text":
            raise InvalidValueError(f"model version {self.version} is not a text model with a tokenizer")
        if self._encoder is None:
            from fedpeft_edge.data.text import TextEncoder

            self._encoder = TextEncoder(self.directory / pre["tokenizer"])
        return self._encoder.encode(list(texts), int(pre["max_len"]))

    def encode_images(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 images ``[H, W]`` / ``[H, W, C]`` of any sizes -> the model's normalised NCHW batch."""
        from fedpeft_edge.data.images import preprocess_images

        pre = self.preprocessing or {}
        if pre.get("kind") != "image":
            raise InvalidValueError(f"model version {self.version} is not an image model")
        batch = [
            preprocess_images(
                np.asarray(im)[None],
                int(pre["image_size"]),
                pre["mean"],
                pre["std"],
                channels=int(pre.get("channels", 3)),
            )
            for im in images
        ]
        name = next(iter(self.input_dtypes))
        return {name: np.concatenate(batch) if batch else np.zeros((0, 1, 1, 1), np.float32)}

    @staticmethod
    def probabilities(logits: np.ndarray) -> np.ndarray:
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


__all__ = [
    "CURRENT",
    "DEPLOY",
    "MODEL_DIR",
    "DeployedModel",
    "ModelStore",
    "export_global",
    "export_version",
    "preprocessing_from_options",
    "read_deploy",
]


if __name__ == "__main__":  # the export child (export_in_child)
    import sys

    _export_job(sys.argv[1])
