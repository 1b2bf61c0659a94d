"""``fedpeft-edge bundle keygen|sign|verify|inspect`` and the ``--site-bundle`` part of ``prepare``.

The logic is in :mod:`fedpeft_edge.bundle`; this module only parses flags and prints. Imports beyond
argparse happen inside the runners, so ``--help`` stays instant (no numpy, no cryptography).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

BUNDLE_HELP = "site bundles: make a signing key, sign, verify and inspect a bundle file"
BUNDLE_DESCRIPTION = """\
A site bundle is the one file `fedpeft-edge prepare --site-bundle FILE` writes: the gradient model, the
tokenizer or image preprocessing, the label names, the PEFT spec and the fleet's codec defaults, with a
manifest holding the sha256 of every member. An Ed25519 signature over the manifest vouches for all of it;
an agent with [bundle] path and public_key verifies it before anything else and refuses it otherwise.

  keygen --out KEYDIR         new key pair: KEYDIR/<name>.key (private, mode 0600) and <name>.pub
  sign FILE --key PRIV        sign (or re-sign) a bundle, in place or to --out
  verify FILE --pubkey PUB    check structure, signature and every member's sha256; exit 0 when
                              verified, 1 when refused (one line with the reason), 2 on other errors
  inspect FILE                print the manifest (the signature is not checked: use verify)
"""


def _bundle_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bundle_action", metavar="ACTION", required=True)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    k.add_argument("--out", type=Path, required=True, help="folder for <name>.key and <name>.pub")
    k.add_argument("--name", default="bundle-signing", help="file name stem (default bundle-signing)")
    s = sub.add_parser("sign", help="sign a bundle file with a private key")
    s.add_argument("file", type=Path)
    s.add_argument("--key", type=Path, required=True, help="private key (from keygen)")
    s.add_argument("--out", type=Path, default=None, help="write the signed bundle here (default: in place)")
    v = sub.add_parser("verify", help="verify a bundle: structure, signature, every member's sha256")
    v.add_argument("file", type=Path)
    v.add_argument("--pubkey", type=Path, default=None, help="trusted public key (PEM)")
    v.add_argument("--allow-unsigned", action="store_true",
                   help="development: accept a bundle without a (checked) signature")
    i = sub.add_parser("inspect", help="print a bundle's manifest in human-readable form")
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true", help="print the manifest JSON as it is")


def _run_bundle(args: argparse.Namespace) -> int:
    actions = {"keygen": _keygen, "sign": _sign, "verify": _verify, "inspect": _inspect}
    return actions[args.bundle_action](args)


def _keygen(args: argparse.Namespace) -> int:
    from fedpeft_edge.bundle.signing import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(args.out, args.name)
    print(f"private key: {priv} (mode 0600; keep it on the central side only)")
    print(f"public key:  {pub} (copy to every site: [bundle] public_key)")
    print(f"key id:      {key_id(load_public_key(pub))}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from fedpeft_edge.bundle.build import sign_bundle
    from fedpeft_edge.bundle.signing import key_id, load_private_key

    key = load_private_key(args.key)
    summary = sign_bundle(args.file, key, args.out)
    print(f"signed: {summary.path} (bundle {summary.bundle_id}, key {key_id(key.public_key())})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fedpeft_edge.bundle.format import BundleError
    from fedpeft_edge.bundle.signing import load_public_key
    from fedpeft_edge.bundle.verify import verify_bundle

    key = load_public_key(args.pubkey) if args.pubkey is not None else None
    try:
        if key is None and not args.allow_unsigned:
            raise BundleError("no_key", "pass --pubkey (the trusted public key), or --allow-unsigned")
        v = verify_bundle(args.file, key, allow_unsigned=args.allow_unsigned)
    except BundleError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    how = f"signed by key {v.key_id}" if v.signed else "signature NOT checked (--allow-unsigned)"
    print(f"verified: bundle {v.bundle_id} ({how}), {len(v.manifest['files'])} files, "
          f"{v.bytes_checked / 1e6:.1f} MB checked")
    return 0


def describe(manifest: dict[str, Any], signature_key: str | None) -> list[str]:
    """The lines of ``bundle inspect``."""
    m = manifest
    model, peft, rt = m["model"], m["peft"], m["runtime"]
    pre = ", ".join(f"{k}={v}" for k, v in model["preprocessing"].items())
    if model.get("tokenizer"):
        pre += f", tokenizer {model['tokenizer']}"
    labels = m.get("labels")
    graphs = rt.get("graphs", {})
    opsets = ", ".join(f"{d} {v}" for d, v in graphs.get("opsets", {}).items())
    inference = m.get("inference_model") or {}
    lines = [
        f"bundle      {m['bundle_id']}",
        f"format      {m['format']} v{m['format_version']}, created {m['created']} by "
        f"{m.get('created_by', '?')}",
        "signature   " + (f"present, key {signature_key} (not checked here: use `bundle verify`)"
                          if signature_key else "none (unsigned)"),
        f"fleet       {m['fleet']}",
        f"model       {model['kind']}, base sha256 {model['base_sha256']}, inputs "
        f"{', '.join(model.get('input_names', []))}",
        f"inputs      {pre}",
        f"labels      {len(labels)}: {', '.join(labels)}" if labels else
        f"labels      none ({m.get('head_classes')} classes, unnamed)",
        f"peft        {peft.get('method')}, {peft.get('num_trainable', '?'):,} trainable, spec hash "
        f"{peft['spec_hash']}",
        "codec       " + " ".join(f"{k}={v}" for k, v in m["codec"].items()),
        f"runtime     onnxruntime {rt['onnxruntime']} (IR {graphs.get('ir_version', '?')}, opsets {opsets})",
        "inference   " + (str(inference["file"]) if inference.get("file")
                          else f"none: {inference.get('note', '')}"),
        f"files       {len(m['files'])}, {sum(f['bytes'] for f in m['files'].values()) / 1e6:.1f} MB",
    ]
    width = max(len(n) for n in m["files"])
    for name, info in sorted(m["files"].items()):
        lines.append(f"  {name:<{width}}  {info['bytes']:>13,}  sha256 {info['sha256'][:16]}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from fedpeft_edge.bundle.format import BundleError, open_bundle
    from fedpeft_edge.bundle.signing import signature_key_id

    try:
        with open_bundle(args.file) as b:
            if args.json:
                sys.stdout.write(b.manifest_bytes.decode("utf-8"))
                return 0
            named = signature_key_id(b.signature_bytes) if b.signature_bytes else None
            for line in describe(b.manifest, named):
                print(line)
    except BundleError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


COMMANDS = (("bundle", BUNDLE_HELP, BUNDLE_DESCRIPTION, _bundle_args, _run_bundle),)


# ------------------------------------------------------------------------------------ prepare --site-bundle
def add_site_bundle_args(g: Any) -> None:
    """The ``prepare`` flags of the site bundle (an argparse argument group)."""
    g.add_argument("--site-bundle", type=Path, default=None,
                   help="also write ONE file with everything a site needs (bundle verify/inspect it)")
    g.add_argument("--sign-key", type=Path, default=None,
                   help="sign the site bundle with this private key (bundle keygen); else sign it later")
    g.add_argument("--fleet", default="default", help="site bundle: the fleet name (default default)")
    g.add_argument("--codec", default="topk_int8",
                   help="site bundle: the sites' default update codec (default topk_int8)")
    g.add_argument("--topk-ratio", type=float, default=0.01,
                   help="site bundle: share of values top-k sends (default 0.01)")
    g.add_argument("--inference-model", type=Path, default=None,
                   help="site bundle: a self-contained inference .onnx to include (default: none)")


def parse_classes(text: str | None, dataset: str, explicit_dataset: bool) -> tuple[int, list[str] | None]:
    """``--classes``: None (the data set's labels), a count (``8``) or label names (``acq,crude``)."""
    from fedpeft_edge.runtime.errors import InvalidValueError

    if text is None or (text.strip().isdigit() and explicit_dataset):
        from fedpeft_edge.data.datasets import load_dataset

        ds = load_dataset(dataset, "test")
        names = [str(c) for c in ds.classes]
        if text is None or int(text) == len(names):
            return len(names), names
        return int(text), None
    if text.strip().isdigit():
        n = int(text)
        if n < 2:
            raise InvalidValueError(f"--classes {n}: a head needs at least 2 classes")
        return n, None
    from fedpeft_edge.data.local_files import check_classes

    names = [c.strip() for c in text.split(",")]
    return len(names), list(check_classes(names))


def write_prepared_bundle(args: argparse.Namespace, prepared: Any, gradient: Any,
                          labels: list[str] | None) -> Any:
    """``prepare --site-bundle``: the bundle of the prepared backbone's gradient model."""
    from dataclasses import asdict

    from fedpeft_edge.bundle.build import write_site_bundle
    from fedpeft_edge.protocol.codec import CodecConfig
    from fedpeft_edge.protocol.topics import check_name

    codec = asdict(CodecConfig(mode=args.codec, topk_ratio=args.topk_ratio))
    meta = prepared.meta
    if prepared.kind == "text":
        preprocessing: dict[str, Any] = {"max_len": int(args.max_len)}
        tokenizer = meta["tokenizer_json"]
    else:
        preprocessing = {k: meta[k] for k in ("image_size", "mean", "std", "channels") if k in meta}
        tokenizer = None
    key = None
    if args.sign_key is not None:
        from fedpeft_edge.bundle.signing import load_private_key

        key = load_private_key(args.sign_key)
    return write_site_bundle(args.site_bundle, gradient_dir=gradient.directory, kind=prepared.kind,
                             preprocessing=preprocessing, labels=labels,
                             fleet=check_name("fleet name", args.fleet), codec=codec, tokenizer=tokenizer,
                             inference_model=args.inference_model, private_key=key)


__all__ = ["COMMANDS", "add_site_bundle_args", "describe", "parse_classes", "write_prepared_bundle"]
