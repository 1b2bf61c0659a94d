"""A site's bundle (``[bundle]``): verified before anything else, extracted into the state dir, applied.

:func:`prepare_site_bundle` (called first by ``trainer_setup.build_trainer_setup``) verifies the bundle
file with the trusted public key, refusing a tampered, unsigned or mismatched one with one line
(:class:`~fedpeft_edge.bundle.format.BundleError`; the CLI exits 2), unless ``allow_unsigned`` (development).
It extracts the bundle atomically into ``<state_dir>/bundles/<bundle id>`` (reused when a verified
extraction of the same id is there), checks the installed onnxruntime against the bundle's range, and
fills the configuration from it: ``[trainer] gradient_dir``, the model inputs (tokenizer and ``max_len``,
or image size and normalisation) in ``[data] options``, the fleet name and codec when the file left them
at their defaults; the label names must agree with ``[data] classes``.

:class:`BundleGate` is the agent's side of ``fedpeft/<fleet>/bundle``: when the aggregator announces
another bundle id than the one this site holds, the site reports ``needs_bundle`` (detail: the id it
needs) on its status and does not train; replacing the bundle file and restarting the agent picks the
new one up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft_edge.bundle.format import BundleError, BundleLimits
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.config import FleetSettings
from fedpeft_edge.protocol.topics import check_name
from fedpeft_edge.protocol.wire import WireLimits
from fedpeft_edge.runtime.errors import InvalidValueError, WireError
from fedpeft_edge.site.config import AgentConfig

log = logging.getLogger(__name__)

BUNDLES_DIR = "bundles"  # <state_dir>/bundles/<bundle id>: the extracted bundle in use


@dataclass(frozen=True)
class SiteBundle:
    bundle_id: str
    directory: Path
    gradient_dir: Path
    manifest: dict[str, Any]
    signed: bool
    reused: bool


def prepare_site_bundle(cfg: AgentConfig, *, runtime_version: str | None = None) -> SiteBundle | None:
    """Verify, extract and apply ``[bundle] path``; None when no bundle is configured."""
    b = cfg.bundle
    if not b.path:
        return None
    from fedpeft_edge.bundle.format import check_runtime
    from fedpeft_edge.bundle.verify import extract_bundle

    t = cfg.trainer
    if t.gradient_dir or t.bundle_dir:
        raise InvalidValueError("[bundle] path replaces [trainer] gradient_dir and bundle_dir: "
                                "set one of them")
    if t.kind != "gradient":
        raise InvalidValueError(f"[bundle] trains the bundle's gradient model (trainer.kind = 'gradient'), "
                                f"not kind = {t.kind!r}")
    key = None
    if b.public_key:
        from fedpeft_edge.bundle.signing import load_public_key

        key = load_public_key(b.public_key)
    elif not b.allow_unsigned:
        raise BundleError("no_key", "[bundle] public_key is not set (the trusted key that signed the bundle)")
    limits = BundleLimits(max_bundle_bytes=b.max_bytes)
    extracted = extract_bundle(b.path, Path(cfg.agent.state_dir) / BUNDLES_DIR, key,
                               allow_unsigned=b.allow_unsigned, limits=limits)
    if runtime_version is None:
        from fedpeft_edge.runtime.ort_import import ort

        runtime_version = str(ort().__version__)
    check_runtime(extracted.manifest, runtime_version)
    if extracted.signed:
        log.info("bundle %s verified (signed by key %s)%s", extracted.bundle_id[:16], extracted.key_id,
                 "; extraction reused" if extracted.reused else f"; extracted to {extracted.directory}")
    else:
        log.warning("bundle %s accepted WITHOUT a verified signature (allow_unsigned = true): development "
                    "only", extracted.bundle_id[:16])
    _apply(cfg, extracted.manifest, extracted.gradient_dir, extracted.tokenizer)
    return SiteBundle(extracted.bundle_id, extracted.directory, extracted.gradient_dir, extracted.manifest,
                      extracted.signed, extracted.reused)


def _apply(cfg: AgentConfig, manifest: dict[str, Any], gradient_dir: Path, tokenizer: Path | None) -> None:
    """The bundle's settings into the config; what the file set explicitly wins (fleet, codec, inputs)."""
    cfg.trainer.gradient_dir = str(gradient_dir)
    model = manifest["model"]
    if "prepared_dir" not in cfg.data.options:
        meta: dict[str, Any] = {"model_kind": model["kind"], **model["preprocessing"]}
        if tokenizer is not None:
            meta["tokenizer_json"] = str(tokenizer)
        cfg.data.options = {**meta, **cfg.data.options}
    labels = manifest.get("labels")
    if cfg.data.path and labels and list(cfg.data.classes) != list(labels):
        raise BundleError("mismatch",
                          f"[data] classes {list(cfg.data.classes)[:8]} differ from the bundle's labels "
                          f"{list(labels)[:8]} (same names, same order: the head's outputs)")
    fleet = str(manifest.get("fleet") or "")
    if fleet and fleet != cfg.fleet.name:
        if cfg.fleet.name == FleetSettings().name:
            cfg.fleet.name = check_name("fleet name", fleet)
            log.info("fleet %r from the bundle", fleet)
        else:
            log.warning("the bundle was made for fleet %r; [fleet] name %r is used", fleet, cfg.fleet.name)
    codec = manifest.get("codec") or {}
    if codec and cfg.codec == CodecConfig():
        try:
            cfg.codec = CodecConfig(**codec)
        except (TypeError, ValueError) as exc:
            raise BundleError("malformed", f"the bundle's codec defaults {codec} are invalid: {exc}") from exc


class BundleGate:
    """The fleet's bundle id (retained notice from the aggregator) against the one this site holds."""

    def __init__(self, held: str | None) -> None:
        self.held = held
        self.fleet_id: str | None = None
        self._reported: tuple[str, int] | None = None  # (id reported as needed, connection it went out on)

    @property
    def active(self) -> bool:
        return self.held is not None

    def take(self, payload: bytes, fleet: str, limits: WireLimits) -> None:
        """A message on ``fedpeft/<fleet>/bundle``; an empty one (retained notice cleared) forgets it."""
        if not payload:
            self.fleet_id = None
            return
        try:
            notice = notices.decode_bundle_notice(payload, limits)
        except WireError as exc:
            log.warning("ignoring an unreadable bundle notice (%d bytes): %s", len(payload), exc)
            return
        if notice.fleet != fleet:
            log.warning("ignoring a bundle notice for fleet %r", notice.fleet)
            return
        self.fleet_id = notice.bundle_id

    def needed(self) -> str | None:
        """The fleet's bundle id when it is not the one held (None: train)."""
        if self.held is None or self.fleet_id is None or self.fleet_id == self.held:
            return None
        return self.fleet_id

    def blocks(self, publish: Callable[..., None], connect_count: int, rnd: int | None) -> bool:
        """True while the site must not train; publishes ``needs_bundle`` once per id and connection
        (a reconnect re-announces ``online``, so it is said again)."""
        need = self.needed()
        if need is None:
            if self._reported is not None:  # the fleet came back to our bundle
                self._reported = None
                log.info("the fleet trains bundle %s again: training resumes", (self.held or "")[:16])
                publish("online", rnd, "")
            return False
        if self._reported is None or self._reported[0] != need:
            log.warning("needs bundle %s (this site holds %s): not training until the bundle file is "
                        "replaced and the agent restarted", need, self.held)
        if self._reported != (need, connect_count):
            publish("needs_bundle", rnd, need)
            self._reported = (need, connect_count)
        return True


__all__ = ["BUNDLES_DIR", "BundleGate", "SiteBundle", "prepare_site_bundle"]
