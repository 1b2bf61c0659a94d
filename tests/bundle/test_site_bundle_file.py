"""The site bundle file: write → sign → verify → extract on a synthetic LoRA gradient model, and every way
a bundle can be bad, each refused with its own reason and nothing extracted.

Real files throughout: the gradient model is lowered with ORT Training from a synthetic transformer, the
bundle is a zip on disk, the keys are real Ed25519 keys; tampering edits bytes of the file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from bundle_cases import LABELS, flip_byte, keys, make_bundle, members, rewrite, synthetic_gradient_dir

from fedpeft_edge.bundle.build import sign_bundle
from fedpeft_edge.bundle.format import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    BundleLimits,
    compute_bundle_id,
    open_bundle,
    version_in_range,
)
from fedpeft_edge.bundle.signing import sign_manifest
from fedpeft_edge.bundle.verify import VERIFIED_MARKER, extract_bundle, verify_bundle
from fedpeft_edge.peft.lowering import GradientModel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(gradient dir, signed bundle, unsigned bundle, private key, public key, other public key, paths)."""
    root = tmp_path_factory.mktemp("site_bundle")
    gdir = synthetic_gradient_dir(root)
    priv, pub, priv_path, pub_path = keys(root / "keys")
    _, other_pub, _, _ = keys(root / "other-keys")
    signed = make_bundle(root / "signed.bundle", gdir, priv)
    unsigned = make_bundle(root / "unsigned.bundle", gdir)
    return {"root": root, "gdir": gdir, "signed": signed.path, "unsigned": unsigned.path, "priv": priv,
            "pub": pub, "other_pub": other_pub, "priv_path": priv_path, "pub_path": pub_path,
            "id": signed.bundle_id}


def _nothing_extracted(root: Path) -> None:
    assert not root.exists() or [p.name for p in root.iterdir()] == []


def _refused(path: Path, reason: str, pub, tmp_path: Path, **kw) -> BundleError:
    """Refused by verify and by extract with ``reason``; extraction left nothing behind."""
    with pytest.raises(BundleError) as verified:
        verify_bundle(path, pub, **kw)
    assert verified.value.reason == reason, str(verified.value)
    out = tmp_path / "extracted"
    with pytest.raises(BundleError) as extracted:
        extract_bundle(path, out, pub, **kw)
    assert extracted.value.reason == reason
    _nothing_extracted(out)
    text = str(extracted.value)
    assert "\n" not in text and text.startswith(f"bundle refused ({reason}): ")
    return extracted.value


# --- the round trip ----------------------------------------------------------------------------------
def test_write_sign_verify_extract_round_trip(made, tmp_path) -> None:
    v = verify_bundle(made["signed"], made["pub"])
    assert v.signed and v.bundle_id == made["id"] and len(v.bundle_id) == 64
    m = v.manifest
    assert m["format_version"] == 1 and m["labels"] == LABELS and m["fleet"] == "bundle-test"
    assert m["codec"]["mode"] == "int8" and m["model"]["kind"] == "text"
    assert m["model"]["preprocessing"] == {"max_len": 10}
    model = GradientModel.load(made["gdir"])
    assert m["peft"]["spec_hash"] == model.spec_hash and m["model"]["base_sha256"] == model.model_sha256
    assert m["runtime"]["onnxruntime"].startswith(">=") and m["inference_model"]["file"] is None
    assert compute_bundle_id(m) == m["bundle_id"]
    assert set(m["files"]) == {"gradient/gradient.json", "gradient/gradient_model.onnx",
                               "gradient/eval_model.onnx", "gradient/base.data",
                               "gradient/initial_params.npy", "preprocess/tokenizer.json"}
    with zipfile.ZipFile(made["signed"]) as zf:  # stored, manifest first, signature second
        infos = zf.infolist()
        assert [i.filename for i in infos[:2]] == [MANIFEST_NAME, SIGNATURE_NAME]
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}

    root = tmp_path / "state" / "bundles"
    ex = extract_bundle(made["signed"], root, made["pub"])
    assert not ex.reused and ex.directory == root / made["id"] and (ex.directory / VERIFIED_MARKER).is_file()
    for name, info in m["files"].items():
        assert (ex.directory / name).stat().st_size == info["bytes"]
    # the extracted gradient model is the original one: same starting vector, base mappable from the file
    lowered = GradientModel.load(ex.gradient_dir)
    np.testing.assert_array_equal(lowered.initial_vector(), model.initial_vector())
    assert lowered.spec_hash == model.spec_hash
    mapped = lowered.map_base()
    assert mapped and all(isinstance(a, np.ndarray) for a in mapped.values())
    assert ex.tokenizer is not None and ex.tokenizer.is_file()
    assert [p.name for p in root.iterdir()] == [made["id"]]  # no temporary folder left

    again = extract_bundle(made["signed"], root, made["pub"])
    assert again.reused and again.directory == ex.directory
    # a damaged extraction (a file cut short) is not reused: extracted again
    (ex.directory / "gradient" / "base.data").write_bytes(b"short")
    third = extract_bundle(made["signed"], root, made["pub"])
    assert not third.reused
    base_size = m["files"]["gradient/base.data"]["bytes"]
    assert (third.directory / "gradient" / "base.data").stat().st_size == base_size


def test_sign_an_unsigned_bundle_in_place_and_resign_with_another_key(made, tmp_path) -> None:
    path = tmp_path / "b.bundle"
    path.write_bytes(made["unsigned"].read_bytes())
    with pytest.raises(BundleError, match=r"\(unsigned\)"):
        verify_bundle(path, made["pub"])
    assert verify_bundle(path, None, allow_unsigned=True).signed is False
    sign_bundle(path, made["priv"])
    assert verify_bundle(path, made["pub"]).signed
    priv2, pub2, _, _ = keys(tmp_path / "k2")
    sign_bundle(path, priv2)  # replaces the signature; the content and its id stay
    assert verify_bundle(path, pub2).bundle_id == verify_bundle(made["unsigned"], None,
                                                                 allow_unsigned=True).bundle_id
    with pytest.raises(BundleError, match=r"\(bad_signature\)"):
        verify_bundle(path, made["pub"])


def test_runtime_range() -> None:
    assert version_in_range("1.19.2", ">=1.19") and version_in_range("1.32.0", ">=1.19,<2")
    assert not version_in_range("1.18.1", ">=1.19") and not version_in_range("2.0", ">=1.19,<2")
    assert version_in_range("1.20.0rc1", ">=1.20") and version_in_range("1.21.1+cpu", "==1.21.1")


# --- tampering: one flipped byte in any member ----------------------------------------------------------
@pytest.mark.parametrize("member", [MANIFEST_NAME, SIGNATURE_NAME, "gradient/gradient.json",
                                    "gradient/gradient_model.onnx", "gradient/eval_model.onnx",
                                    "gradient/base.data", "gradient/initial_params.npy",
                                    "preprocess/tokenizer.json"])
def test_one_flipped_byte_in_any_member_is_refused(made, tmp_path, member) -> None:
    bad = flip_byte(made["signed"], tmp_path / "flipped.bundle", member, at=1)
    err = _refused(bad, "tampered", made["pub"], tmp_path)
    assert member in str(err)


def test_changed_member_with_a_valid_zip_crc_fails_its_sha256(made, tmp_path) -> None:
    base = members(made["signed"])["gradient/base.data"]
    changed = bytearray(base)
    changed[len(changed) // 2] ^= 0x80
    bad = rewrite(made["signed"], tmp_path / "b.bundle", {"gradient/base.data": bytes(changed)})
    err = _refused(bad, "tampered", made["pub"], tmp_path)
    assert "sha256 does not match" in str(err) and "gradient/base.data" in str(err)


def test_a_replaced_manifest_fails_the_signature(made, tmp_path) -> None:
    other = make_bundle(tmp_path / "other.bundle", made["gdir"], labels=["a", "b", "c"])
    forged = members(other.path)[MANIFEST_NAME]
    bad = rewrite(made["signed"], tmp_path / "b.bundle", {MANIFEST_NAME: forged})
    err = _refused(bad, "bad_signature", made["pub"], tmp_path)
    assert "changed after signing" in str(err)
    # an edited manifest whose id was recomputed: the signature still says no
    m = json.loads(members(made["signed"])[MANIFEST_NAME])
    m["labels"] = ["x", "y", "z"]
    m["bundle_id"] = compute_bundle_id(m)
    bad2 = rewrite(made["signed"], tmp_path / "b2.bundle", {MANIFEST_NAME: json.dumps(m).encode()})
    _refused(bad2, "bad_signature", made["pub"], tmp_path)


def test_a_manifest_whose_id_does_not_match_its_content_is_refused(made, tmp_path) -> None:
    m = json.loads(members(made["signed"])[MANIFEST_NAME])
    m["fleet"] = "elsewhere"  # id left as it was, then signed by the right key
    data = json.dumps(m).encode()
    bad = rewrite(made["signed"], tmp_path / "b.bundle", {MANIFEST_NAME: data,
                                                         SIGNATURE_NAME: sign_manifest(data, made["priv"])})
    _refused(bad, "tampered", made["pub"], tmp_path)


def test_wrong_key_is_refused_and_names_both_keys(made, tmp_path) -> None:
    err = _refused(made["signed"], "bad_signature", made["other_pub"], tmp_path)
    assert "signed by key" in str(err) and "the trusted key is" in str(err)


def test_unsigned_bundle_is_refused_unless_allowed(made, tmp_path) -> None:
    _refused(made["unsigned"], "unsigned", made["pub"], tmp_path)
    _refused(made["signed"], "no_key", None, tmp_path)
    ex = extract_bundle(made["unsigned"], tmp_path / "dev", None, allow_unsigned=True)
    assert not ex.signed and (ex.directory / "gradient" / "gradient.json").is_file()
    # allow_unsigned never excuses a signature that does not verify
    _refused(made["signed"], "bad_signature", made["other_pub"], tmp_path, allow_unsigned=True)


@pytest.mark.parametrize("keep", [0, 21, 1000, -1])
def test_truncated_file_is_refused(made, tmp_path, keep) -> None:
    data = made["signed"].read_bytes()
    bad = tmp_path / "cut.bundle"
    bad.write_bytes(data[:keep])  # -1: only the last byte missing
    _refused(bad, "truncated", made["pub"], tmp_path)


@pytest.mark.parametrize(("name", "what"), [("../evil", "'..'"), ("gradient/../../evil", "'..'"),
                                            ("/etc/evil", "absolute"), ("C:/evil", "absolute"),
                                            ("gradient\\evil", "backslash"), ("gradient/.hidden", "plain")])
def test_path_traversal_members_are_refused(made, tmp_path, name, what) -> None:
    info = zipfile.ZipInfo(name)
    bad = rewrite(made["signed"], tmp_path / "evil.bundle", extra=[(info, b"pwned")])
    err = _refused(bad, "unsafe_path", made["pub"], tmp_path)
    assert what in str(err)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_symlink_and_directory_members_are_refused(made, tmp_path) -> None:
    link = zipfile.ZipInfo("gradient/link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = rewrite(made["signed"], tmp_path / "link.bundle", extra=[(link, b"/etc/passwd")])
    assert "symbolic link" in str(_refused(bad, "unsafe_path", made["pub"], tmp_path))
    folder = zipfile.ZipInfo("gradient/sub/")
    bad2 = rewrite(made["signed"], tmp_path / "dir.bundle", extra=[(folder, b"")])
    _refused(bad2, "unsafe_path", made["pub"], tmp_path)


def test_oversized_member_and_bundle_are_refused(made, tmp_path) -> None:
    size = made["signed"].stat().st_size
    err = _refused(made["signed"], "oversized", made["pub"], tmp_path,
                   limits=BundleLimits(max_member_bytes=4096))
    assert "limit 4096" in str(err)
    _refused(made["signed"], "oversized", made["pub"], tmp_path,
             limits=BundleLimits(max_bundle_bytes=size - 1))
    # a member whose header claims more bytes than the file holds
    data = bytearray(made["signed"].read_bytes())
    with zipfile.ZipFile(made["signed"]) as zf:
        cd_start = zf.start_dir
    pos = data.index(b"PK\x01\x02" + data[cd_start + 4:cd_start + 20], cd_start)  # first central entry
    data[pos + 20:pos + 28] = (2**31).to_bytes(4, "little") * 2  # stored and declared size of manifest.json
    lying = tmp_path / "lying.bundle"
    lying.write_bytes(bytes(data))
    assert "the file has" in str(_refused(lying, "truncated", made["pub"], tmp_path))


def test_unknown_format_version_is_refused_even_when_signed(made, tmp_path) -> None:
    m = json.loads(members(made["signed"])[MANIFEST_NAME])
    m["format_version"] = 2
    m["bundle_id"] = compute_bundle_id(m)
    data = json.dumps(m).encode()
    bad = rewrite(made["signed"], tmp_path / "v2.bundle", {MANIFEST_NAME: data,
                                                          SIGNATURE_NAME: sign_manifest(data, made["priv"])})
    assert "format version 2" in str(_refused(bad, "unknown_format", made["pub"], tmp_path))


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the duplicate is the point
def test_unlisted_or_missing_members_are_refused(made, tmp_path) -> None:
    extra = rewrite(made["signed"], tmp_path / "extra.bundle", extra=[("gradient/extra.onnx", b"x")])
    assert "not listed" in str(_refused(extra, "tampered", made["pub"], tmp_path))
    missing = rewrite(made["signed"], tmp_path / "missing.bundle", {"gradient/eval_model.onnx": None})
    assert "missing" in str(_refused(missing, "tampered", made["pub"], tmp_path))
    dup = rewrite(made["signed"], tmp_path / "dup.bundle", extra=[("gradient/base.data", b"x")])
    _refused(dup, "malformed", made["pub"], tmp_path)


def test_compressed_members_are_refused(made, tmp_path) -> None:
    bad = tmp_path / "deflated.bundle"
    with zipfile.ZipFile(made["signed"]) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert "compressed" in str(_refused(bad, "malformed", made["pub"], tmp_path))


def test_open_bundle_reads_no_member_content(made) -> None:
    with open_bundle(made["signed"]) as b:
        assert b.bundle_id == made["id"] and b.signature_bytes is not None


# --- the command line -----------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fedpeft_edge", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_cli_keygen_sign_verify_inspect(made, tmp_path) -> None:
    r = _cli("bundle", "keygen", "--out", str(tmp_path / "keys"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    priv, pub = tmp_path / "keys" / "bundle-signing.key", tmp_path / "keys" / "bundle-signing.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and pub.is_file()
    again = _cli("bundle", "keygen", "--out", str(tmp_path / "keys"), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a key

    b = tmp_path / "site.bundle"
    b.write_bytes(made["unsigned"].read_bytes())
    r = _cli("bundle", "verify", str(b), "--pubkey", str(pub), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().startswith("bundle refused (unsigned)")
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("bundle", "sign", str(b), "--key", str(priv), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("bundle", "verify", str(b), "--pubkey", str(pub), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("verified: bundle "), r.stderr
    r = _cli("bundle", "verify", str(b), "--pubkey", str(made["pub_path"]), cwd=tmp_path)
    assert r.returncode == 1 and "(bad_signature)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = flip_byte(b, tmp_path / "bad.bundle", "gradient/base.data", at=3)
    r = _cli("bundle", "verify", str(bad), "--pubkey", str(pub), cwd=tmp_path)
    assert r.returncode == 1 and "(tampered)" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    r = _cli("bundle", "inspect", str(b), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for expected in ("bundle      ", "signature   present, key", "fleet       bundle-test",
                     "labels      3: normal, bearing_fault, misalignment", "runtime     onnxruntime >=",
                     "gradient/base.data", "inference   none"):
        assert expected in text
    r = _cli("bundle", "inspect", str(b), "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["labels"] == LABELS
