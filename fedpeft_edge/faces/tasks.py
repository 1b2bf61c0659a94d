"""Tasks shared by the demo, the experiment and the bench: a model, a data subset, a federated split.

A *task* is "this backbone on this dataset": the prepared ONNX backbone (cached), encoded model inputs for
a training pool and a global test set, and a split of the pool over sites. Each site's shard is cut again
into a local training part and a local test part, so personalisation is measured on data the site never
trained on. PEFT specs per method and the artifact cache (one bundle per model and spec, and its lowered
gradient model) live here too, so every cell of an experiment grid and every demo run reuse the same
artifacts.
"""

from __future__ import annotations

import builtins
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, SpecError, ensure

TASK_KINDS = ("text", "image")
METHOD_NAMES = ("lora", "ffa_lora", "adapter", "bitfit", "head_only", "full", "prompt", "select")


# ------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class TaskConfig:
    """Which backbone and data; sizes are counts of samples drawn (stratified) from the official splits."""

    kind: str = "text"
    dataset: str = "reuters_r8"
    train_size: int = 1200
    test_size: int = 400
    max_len: int = 64
    image_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        ensure(self.kind in TASK_KINDS, f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")
        ensure(_pos_int(self.train_size), f"train_size must be a positive int, got {self.train_size!r}")
        ensure(_pos_int(self.test_size), f"test_size must be a positive int, got {self.test_size!r}")
        ensure(_pos_int(self.max_len) and self.max_len >= 4, f"max_len must be an int >= 4: {self.max_len!r}")
        ensure(_pos_int(self.image_size) and self.image_size >= 16, f"bad image_size {self.image_size!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TaskConfig:
        return cls(**_known_keys(cls, data, "task"))


@dataclass(frozen=True)
class SplitConfig:
    """How the training pool is spread over sites: ``iid``, ``dirichlet`` (alpha over labels) or ``group``."""

    mode: str = "dirichlet"
    alpha: float = 1.0

    def __post_init__(self) -> None:
        ensure(self.mode in ("iid", "dirichlet", "group"), f"unknown split mode {self.mode!r}")
        ensure(self.alpha > 0, f"dirichlet alpha must be > 0, got {self.alpha!r}")

    @classmethod
    def parse(cls, text: str) -> SplitConfig:
        """``"iid"``, ``"group"``, ``"dirichlet:0.1"`` (or ``"dir0.1"``)."""
        ensure(isinstance(text, str) and text, f"a split must be a non-empty string, got {text!r}")
        lowered = text.strip().lower()
        if lowered in ("iid", "group"):
            return cls(mode=lowered)
        for prefix in ("dirichlet:", "dirichlet", "dir:", "dir"):
            if lowered.startswith(prefix):
                try:
                    return cls(mode="dirichlet", alpha=float(lowered[len(prefix) :]))
                except builtins.ValueError as exc:
                    raise InvalidValueError(f"bad Dirichlet alpha in split {text!r}") from exc
        raise InvalidValueError(f"unknown split {text!r}; use iid, group or dirichlet:<alpha>")

    @property
    def label(self) -> str:
        return f"dirichlet {self.alpha:g}" if self.mode == "dirichlet" else self.mode


def _pos_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) > 0


def _known_keys(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidValueError(
            f"unknown {what} keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dict(data)


# --------------------------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """Encoded inputs for one task, plus the prepared backbone they feed."""

    config: TaskConfig
    prepared: Any  # fedpeft_edge.models.prepare.PreparedModel
    classes: list[str]
    train_inputs: dict[str, np.ndarray]
    train_labels: np.ndarray
    train_groups: np.ndarray | None
    test_inputs: dict[str, np.ndarray]
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def kind(self) -> str:
        return self.config.kind

    def majority_accuracy(self) -> float:
        """Accuracy of always predicting the commonest test class: a floor any trained model must beat."""
        counts = np.bincount(self.test_labels, minlength=self.num_classes)
        return float(counts.max() / max(1, counts.sum()))


def prepare_backbone(config: TaskConfig, cache_dir: Path | None = None) -> Any:
    """The exported ONNX backbone for a task (cached by B's prepare step; torch only on a cache miss)."""
    from fedpeft_edge.models.prepare import prepare_image_model, prepare_text_model

    if config.kind == "text":
        return prepare_text_model(cache_dir=cache_dir, max_len=config.max_len)
    return prepare_image_model(cache_dir=cache_dir, image_size=config.image_size)


def encode_inputs(ds: Any, prepared: Any, config: TaskConfig) -> dict[str, np.ndarray]:
    """Model inputs for a dataset: token ids + mask for text, normalised NCHW float32 for images."""
    from fedpeft_edge.data.features import encode_for_model

    return encode_for_model(ds, prepared.meta, config.kind)


def load_task(config: TaskConfig, *, cache_dir: Path | None = None) -> TaskData:
    """Load, subsample and encode the training pool and the global test set of a task."""
    from fedpeft_edge.data.datasets import IMAGE_DATASETS, TEXT_DATASETS, load_dataset, subsample

    allowed = TEXT_DATASETS if config.kind == "text" else IMAGE_DATASETS
    ensure(
        config.dataset in allowed, f"{config.dataset!r} is not one of the {config.kind} data sets {allowed}"
    )
    prepared = prepare_backbone(config, cache_dir)
    train = subsample(load_dataset(config.dataset, "train"), config.train_size, seed=config.seed)
    test = subsample(load_dataset(config.dataset, "test"), config.test_size, seed=config.seed + 1)
    return TaskData(
        config=config,
        prepared=prepared,
        classes=list(train.classes),
        train_inputs=encode_inputs(train, prepared, config),
        train_labels=train.labels,
        train_groups=train.groups,
        test_inputs=encode_inputs(test, prepared, config),
        test_labels=test.labels,
    )


def take(inputs: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


@dataclass
class SiteShard:
    """One site's data: a local training part and a local test part (for personalisation)."""

    site: int
    train_idx: np.ndarray
    test_idx: np.ndarray

    @property
    def num_train(self) -> int:
        return int(self.train_idx.size)


def split_sites(
    task: TaskData, split: SplitConfig, num_sites: int, *, seed: int = 0, local_test_fraction: float = 0.25
) -> list[SiteShard]:
    """Partition the training pool over ``num_sites`` and hold out a local test part of each shard."""
    ensure(_pos_int(num_sites), f"num_sites must be a positive int, got {num_sites!r}")
    ensure(0.0 < local_test_fraction < 1.0, f"local_test_fraction must be in (0, 1): {local_test_fraction}")
    parts = partition_indices(task.train_labels, task.train_groups, split, num_sites, seed=seed)
    rng = np.random.default_rng(seed + 7919)
    shards = []
    for site, idx in enumerate(parts):
        idx = rng.permutation(np.asarray(idx, dtype=np.int64))
        n_test = round(idx.size * local_test_fraction) if idx.size >= 4 else 0
        shards.append(SiteShard(site, np.sort(idx[n_test:]), np.sort(idx[:n_test])))
    for shard in shards:
        if shard.num_train == 0:
            raise InvalidValueError(
                f"site {shard.site} got no training samples under split {split.label} with {num_sites} "
                "sites; use more training samples, fewer sites or a larger alpha"
            )
    return shards


def partition_indices(
    labels: np.ndarray, groups: np.ndarray | None, split: SplitConfig, num_sites: int, *, seed: int
) -> list[np.ndarray]:
    """Index lists per site, from the data layer's partitioner."""
    from fedpeft_edge.data.partition import partition

    parts = partition(split.mode, labels, groups, num_sites, split.alpha, seed)
    return [np.asarray(p, dtype=np.int64) for p in parts]


def iterate(
    inputs: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Batches as ``{input names..., "labels": int64}``; endless when shuffling (a new order per epoch)."""
    from fedpeft_edge.data.batches import iterate_batches

    ensure(int(labels.shape[0]) > 0, "cannot iterate over an empty data set")
    epoch = 0
    while True:
        yield from iterate_batches(inputs, labels, batch_size, shuffle=shuffle, seed=seed + 1000003 * epoch)
        if not shuffle:
            return
        epoch += 1


# -------------------------------------------------------------------------------------------- specs


LORA_TARGETS = {
    "text": {"targets": (r"attention\.self\.(query|value)\.weight",), "target_ops": ("MatMul",)},
    "image": {"targets": (r"_project_conv\.weight",), "target_ops": ("Conv",)},
}
ADAPTER_TARGETS = {
    "text": {"targets": (r"layer\.\d+\.output\.dense\.weight",), "target_ops": ("MatMul",)},
    "image": {"targets": (r"_project_conv\.weight",), "target_ops": ("Conv",)},
}


def method_spec(method: str, kind: str, num_classes: int, overrides: Mapping[str, Any] | None = None) -> Any:
    """A PeftSpec for ``method`` on the task's backbone, with a new head for the task's labels."""
    from fedpeft_edge.peft.spec import PeftSpec

    ensure(kind in TASK_KINDS, f"unknown task kind {kind!r}")
    base: dict[str, Any] = {"method": method, "head_classes": int(num_classes)}
    if method in ("lora", "ffa_lora"):
        base.update(LORA_TARGETS[kind], rank=8, alpha=16.0)
    elif method == "adapter":
        base.update(ADAPTER_TARGETS[kind], adapter_dim=16)
    elif method == "select":
        base["select_patterns"] = (r"LayerNorm",) if kind == "text" else (r"_bn",)
    elif method not in ("bitfit", "head_only", "full", "prompt"):
        raise SpecError(f"unknown PEFT method {method!r}; expected one of {', '.join(METHOD_NAMES)}")
    if overrides:
        base.update(dict(overrides))
    return PeftSpec.from_dict(base)


# ---------------------------------------------------------------------------------- artifact cache


def bundle_cache_key(prepared: Any, spec: Any) -> str:
    return f"{prepared.kind}-{spec.method}-{spec.spec_hash(prepared.meta.get('onnx_sha256'))[:16]}"


def get_bundle(prepared: Any, spec: Any, cache_dir: Path | None = None, *, log: Any = None) -> Any:
    """The ORT training artifacts for (backbone, spec): generated once, then loaded from the cache."""
    from fedpeft_edge.models.prepare import default_cache_dir
    from fedpeft_edge.peft.artifacts import ArtifactBundle, generate_artifacts

    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    final = root / bundle_cache_key(prepared, spec)
    if final.exists():
        try:
            return ArtifactBundle.load(final)
        except FedPeftError:
            shutil.rmtree(final, ignore_errors=True)  # an unreadable entry is rebuilt, never half-used
    if log is not None:
        log(f"generating training artifacts for {spec.method} on the {prepared.kind} model (first run only)")
    # generate_artifacts builds in a private temp dir and renames into place when complete.
    return generate_artifacts(prepared.onnx_path, spec, final)


def get_gradient_model(bundle: Any, cache_dir: Path | None = None, *, log: Any = None) -> Any:
    """The bundle lowered to a gradient model (stock onnxruntime): made once, then loaded from the cache."""
    from fedpeft_edge.models.prepare import default_cache_dir
    from fedpeft_edge.peft.lowering import MANIFEST
    from fedpeft_edge.site.trainer_setup import cached_gradient_model

    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "gradient_models"
    folder = root / Path(bundle.directory).name  # named like the bundle: one per (backbone, spec)
    if log is not None and not (folder / MANIFEST).is_file():
        log("lowering the training artifacts to a gradient model for stock onnxruntime (first run only)")
    return cached_gradient_model(bundle, folder)


@dataclass
class PeakRss:
    """Samples this process's resident set size in a thread; ``peak_mb`` is the maximum since ``reset``."""

    interval: float = 0.05
    _peak: int = 0
    _stop: Any = None
    _thread: Any = None
    _samples: list[int] = field(default_factory=list)

    def __enter__(self) -> PeakRss:
        import threading

        import psutil

        proc = psutil.Process()
        self._peak = proc.memory_info().rss
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def reset(self) -> None:
        import psutil

        self._peak = psutil.Process().memory_info().rss

    @property
    def peak_mb(self) -> float:
        import psutil

        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        return self._peak / 1e6

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=1.0)
