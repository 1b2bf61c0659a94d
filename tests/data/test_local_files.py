"""Site-local data files (fedpeft_edge/data/local_files.py) and the ``[data] path`` configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.data.datasets import ImageDataset, TextDataset
from fedpeft_edge.data.local_files import LocalDataLimits, load_local_dataset, split_eval
from fedpeft_edge.runtime.errors import FedPeftError
from fedpeft_edge.site.config import load_agent_config

CLASSES = ["normal", "bearing_fault", "misalignment"]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# --- text: JSON Lines -----------------------------------------------------------------------------------
def test_jsonl_names_and_ids_map_through_the_class_list(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "vibration within limits", "label": "normal"},
        "",  # blank lines are skipped
        {"text": "high-frequency peaks at the outer race", "label": "misalignment", "site_row": 7},
        {"text": "axial vibration at 2x running speed", "label": 1},  # integer = class id
        {"text": "caf\u00e9 \u2013 unicode survives", "label": "normal"},
    ])
    ds = load_local_dataset(path, CLASSES)
    assert isinstance(ds, TextDataset)
    assert ds.classes == CLASSES and ds.name == "local:d.jsonl"
    assert ds.labels.tolist() == [0, 2, 1, 0]
    assert ds.texts[3] == "caf\u00e9 \u2013 unicode survives"


def test_two_sites_get_the_same_id_for_the_same_label(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "misalignment"},
                                           {"text": "y", "label": "normal"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "z", "label": "normal"},
                                           {"text": "w", "label": "misalignment"}])
    da, db = load_local_dataset(a, CLASSES), load_local_dataset(b, CLASSES)
    # ids follow the configured class list, not the order labels first appear in a file
    assert da.labels.tolist() == [2, 0] and db.labels.tolist() == [0, 2]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok", "label": "normal"', "not valid JSON"),
    ('["text", "normal"]', "expected a JSON object"),
    ('{"text": "no label"}', "missing key(s) ['label']"),
    ('{"text": 42, "label": "normal"}', "'text' must be a string"),
    ('{"text": "   ", "label": "normal"}', "empty text"),
    ('{"text": "t", "label": true}', "class name (string) or a class id"),
    ('{"text": "t", "label": 3.0}', "class name (string) or a class id"),
    ('{"text": "t", "label": 3}', "label id 3 outside 0..2"),
    ('{"text": "t", "label": -1}', "label id -1 outside 0..2"),
    ('{"text": "t", "label": "overheating"}', "unknown label 'overheating'"),
])
def test_jsonl_bad_row_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "normal"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_local_dataset(path, CLASSES)
    assert isinstance(info.value, FedPeftError)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


def test_jsonl_not_utf8_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok", "label": "normal"}\n{"text": "caf\xe9", "label": "normal"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_local_dataset(bad, CLASSES)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no samples"):
        load_local_dataset(empty, CLASSES)


# --- text: CSV ------------------------------------------------------------------------------------------
def test_csv_with_quotes_newlines_extra_columns_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffid,label,text\n"
                     '1,normal,"plain, with a comma"\n'
                     '2,bearing_fault,"two\nlines and ""quotes"""\n'
                     "\n"
                     "3, misalignment ,x\n".encode())
    ds = load_local_dataset(path, CLASSES)
    assert isinstance(ds, TextDataset)
    assert ds.texts == ["plain, with a comma", 'two\nlines and "quotes"', "x"]
    assert ds.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("body, message", [
    ("text,category\nx,normal\n", "lacks column(s) ['label']"),
    ("text,label,text\nx,normal,y\n", "repeats a column"),
    ("text,label\nx,normal\ny\n", ":3: expected 2 columns, got 1"),
    ("text,label\nx,normal\ny,3\n", ":3: unknown label '3'"),  # CSV labels are names, never ids
    ("", "empty CSV file"),
])
def test_csv_malformed(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_local_dataset(path, CLASSES)
    assert message in str(info.value)


def test_csv_field_over_the_text_limit_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "a" * 5000 + ",normal\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"long\.csv:2: malformed CSV"):
        load_local_dataset(path, CLASSES, limits=LocalDataLimits(max_text_chars=100))
    # within csv's field cap but over the text limit: the text check names the row
    path.write_text("text,label\n" + "a" * 150 + ",normal\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"long\.csv:2: text of 150 characters exceeds 100"):
        load_local_dataset(path, CLASSES, limits=LocalDataLimits(max_text_chars=100))


# --- limits ---------------------------------------------------------------------------------------------
def test_size_row_and_text_limits(tmp_path: Path) -> None:
    rows = [{"text": f"reading {i}", "label": "normal"} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    size = path.stat().st_size
    exact = LocalDataLimits(max_file_bytes=size, max_rows=10)
    assert len(load_local_dataset(path, CLASSES, limits=exact)) == 10
    with pytest.raises(ValueError, match=f"{size:,} bytes exceeds the limit of {size - 1:,}"):
        load_local_dataset(path, CLASSES, limits=LocalDataLimits(max_file_bytes=size - 1))
    with pytest.raises(ValueError, match="more than 9 rows"):
        load_local_dataset(path, CLASSES, limits=LocalDataLimits(max_rows=9))
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 101, "label": "normal"}])
    with pytest.raises(ValueError, match=r"long\.jsonl:1: text of 101 characters exceeds 100"):
        load_local_dataset(long, CLASSES, limits=LocalDataLimits(max_text_chars=100))
    with pytest.raises(ValueError, match="positive integer"):
        LocalDataLimits(max_rows=0)


def test_file_type_missing_file_and_class_list(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unsupported data file type '\.txt'"):
        load_local_dataset(tmp_path / "d.txt", CLASSES)
    with pytest.raises(ValueError, match="cannot read data file"):
        load_local_dataset(tmp_path / "absent.jsonl", CLASSES)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "normal"}])
    with pytest.raises(ValueError, match="non-empty list"):
        load_local_dataset(path, [])
    with pytest.raises(ValueError, match="unique"):
        load_local_dataset(path, ["normal", "normal"])


# --- images: .npz ---------------------------------------------------------------------------------------
def test_npz_grayscale_int_ids_and_colour_string_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 12, 10), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=gray, labels=np.array([0, 2, 1, 1, 0], dtype=np.int32))
    ds = load_local_dataset(tmp_path / "g.npz", CLASSES)
    assert isinstance(ds, ImageDataset)
    np.testing.assert_array_equal(ds.images, gray)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 2, 1, 1, 0]

    colour = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", images=colour,
                        labels=np.array(["misalignment", "normal", "normal"]))
    ds = load_local_dataset(tmp_path / "c.npz", CLASSES)
    assert ds.images.shape == (3, 8, 8, 3) and ds.labels.tolist() == [2, 0, 0]

    one = rng.integers(0, 256, (2, 6, 6, 1), dtype=np.uint8)
    np.savez(tmp_path / "o.npz", images=one, labels=np.array([1, 1]))
    assert load_local_dataset(tmp_path / "o.npz", CLASSES).images.shape == (2, 6, 6)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4), np.float32), "labels": np.array([0, 1])}, "images must be uint8"),
    ({"images": np.zeros((2, 4), np.uint8), "labels": np.array([0, 1])}, "[N, H, W] or [N, H, W, C]"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": np.array([0, 1])}, "1 or 3 channels"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 1, 2])}, "labels must have shape (2,)"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 5])}, "row 1: label id 5 outside"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array(["normal", "rust"])},
     "row 1: unknown label 'rust'"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0.0, 1.0])}, "integer ids or strings"),
    ({"images": np.zeros((2, 4, 4), np.uint8)}, "missing array 'labels'"),
    ({"images": np.zeros((0, 4, 4), np.uint8), "labels": np.zeros(0, np.int64)}, "no images"),
])
def test_npz_malformed(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as info:
        load_local_dataset(tmp_path / "bad.npz", CLASSES)
    assert message in str(info.value) and "bad.npz" in str(info.value)


def test_npz_never_unpickles_and_bounds_unpacked_size(tmp_path: Path) -> None:
    obj = np.array(["normal", {"evil": 1}], dtype=object)
    np.savez(tmp_path / "obj.npz", images=np.zeros((2, 4, 4), np.uint8), labels=obj)
    with pytest.raises(ValueError, match="without pickle"):
        load_local_dataset(tmp_path / "obj.npz", CLASSES)
    # 4 MB of zeros compresses to a few KB: the unpacked size is what counts
    np.savez_compressed(tmp_path / "bomb.npz", images=np.zeros((64, 256, 256), np.uint8),
                        labels=np.zeros(64, np.int64))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    with pytest.raises(ValueError, match="arrays unpack to"):
        load_local_dataset(tmp_path / "bomb.npz", CLASSES, limits=LocalDataLimits(max_file_bytes=1_000_000))
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"not a valid \.npz"):
        load_local_dataset(tmp_path / "junk.npz", CLASSES)
    np.savez(tmp_path / "many.npz", images=np.zeros((5, 2, 2), np.uint8), labels=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="5 images exceed 4"):
        load_local_dataset(tmp_path / "many.npz", CLASSES, limits=LocalDataLimits(max_rows=4))


# --- held-out split -------------------------------------------------------------------------------------
def test_split_eval_is_deterministic_disjoint_and_complete() -> None:
    ev, tr = split_eval(64, 0.25, seed=3)
    assert len(ev) == 16 and len(tr) == 48
    assert sorted(np.concatenate([ev, tr]).tolist()) == list(range(64))
    ev2, _ = split_eval(64, 0.25, seed=3)
    ev3, _ = split_eval(64, 0.25, seed=4)
    np.testing.assert_array_equal(ev, ev2)
    assert not np.array_equal(ev, ev3)
    assert len(split_eval(10, 0.01, 0)[0]) == 1  # a positive fraction holds out at least one sample
    assert len(split_eval(10, 0.0, 0)[0]) == 0 and len(split_eval(4, 0.5, 0)[0]) == 0
    with pytest.raises(ValueError, match="eval_fraction"):
        split_eval(10, 1.0, 0)


# --- configuration --------------------------------------------------------------------------------------
def test_config_path_and_dataset_are_exclusive() -> None:
    ok = load_agent_config(
        text='[data]\npath = "/srv/site.jsonl"\nclasses = ["a", "b"]\neval_fraction = 0.1\n')
    assert ok.data.path == "/srv/site.jsonl" and ok.data.classes == ["a", "b"] and ok.data.dataset is None
    assert load_agent_config(text='[data]\ndataset = "reuters_r8"\n').data.dataset == "reuters_r8"
    assert load_agent_config(text="").data.path is None  # neither: a service without local data (aggregator)
    bad = {
        '[data]\ndataset = "reuters_r8"\npath = "/srv/site.jsonl"\nclasses = ["a"]\n': "not both",
        '[data]\npath = "/srv/site.jsonl"\n': "non-empty list",
        '[data]\npath = "/srv/site.jsonl"\nclasses = ["a", "a"]\n': "unique",
        '[data]\npath = "/srv/site.jsonl"\nclasses = [1, 2]\n': "non-empty strings",
        '[data]\ndataset = "reuters_r8"\nclasses = ["a"]\n': "applies to path only",
        '[data]\npath = "/srv/site.jsonl"\nclasses = ["a"]\neval_fraction = 1.0\n': "eval_fraction",
        '[data]\npath = "/srv/site.jsonl"\nclasses = ["a"]\nlabels = ["a"]\n': "unknown key",
        '[data]\npath = "/srv/site.jsonl"\nclasses = ["a"]\nmax_rows = 0\n': "max_rows must be a positive",
        '[data]\npath = "/srv/site.jsonl"\nclasses = ["a"]\nmax_file_bytes = "1G"\n': "wrong type",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError) as info:
            load_agent_config(text=text)
        assert message in str(info.value), (text, str(info.value))


def test_cli_override_conflict_is_caught_before_training(tmp_path: Path) -> None:
    from fedpeft_edge.protocol.config import override
    from fedpeft_edge.site.trainer_setup import build_trainer_setup

    cfg = load_agent_config(text=f'[trainer]\nbundle_dir = "{tmp_path}"\n[data]\npath = "/srv/x.jsonl"\n'
                           'classes = ["a", "b"]\n')
    override(cfg.data, dataset="reuters_r8")  # e.g. `--dataset` given next to a configured path
    with pytest.raises(ValueError, match="not both"):
        build_trainer_setup(cfg)


@pytest.mark.slow  # exports MiniLM with torch on a cold model cache (a cache hit reads JSON only)
def test_site_arrays_from_a_local_file_with_the_prepared_tokenizer(tmp_path: Path) -> None:
    """The agent's data path without a bundle: tokenised with the prepared model's tokenizer (max_len
    from the options), held-out part by seed, max_samples applied to both parts."""
    from fedpeft_edge.models.prepare import prepare_text_model
    from fedpeft_edge.site.trainer_setup import site_arrays

    prepared = prepare_text_model()  # a cache hit after the first run (reads JSON, no torch)
    rows = [{"text": f"machine {i} reports {'vibration' if i % 2 else 'nominal values'}",
             "label": CLASSES[i % 3]} for i in range(20)]
    path = write_jsonl(tmp_path / "site.jsonl", rows)
    toml = (f'[data]\npath = "{path}"\nclasses = {json.dumps(CLASSES)}\neval_fraction = 0.25\nseed = 5\n'
            f'options = {{ prepared_dir = "{prepared.onnx_path.parent}", max_len = 12 }}\n')
    tr_in, tr_y, ev_in, ev_y = site_arrays(load_agent_config(text=toml))
    assert tr_in["input_ids"].shape == (15, 12) and ev_in["attention_mask"].shape == (5, 12)
    expected = np.array([i % 3 for i in range(20)])
    ev_idx, tr_idx = split_eval(20, 0.25, 5)
    assert ev_y.tolist() == expected[ev_idx].tolist() and tr_y.tolist() == expected[tr_idx].tolist()
    small = load_agent_config(text=toml + "max_samples = 8\n")
    tr_in, tr_y, ev_in, ev_y = site_arrays(small)
    assert (len(tr_y), len(ev_y)) == (6, 2)
