"""Declarative PEFT configuration (what to train) and its stable hash.

The hash goes into every update envelope: an aggregator refuses updates made with another adapter layout.
It is sha256 over canonical JSON (sorted keys, compact separators, ASCII), so it is identical across
processes, platforms and Python versions; the base model's sha256 joins the hash input when given.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedpeft_edge.runtime.errors import SpecError
from fedpeft_edge.runtime.names import PEFT_METHODS

METHODS = PEFT_METHODS
LORA_OPS = ("MatMul", "Gemm", "Conv")
ADAPTER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
SPEC_VERSION = 1


@dataclass(frozen=True)
class PeftSpec:
    """What to make trainable and how.

    ``targets`` are regular expressions searched (``re.search``) in node names and weight-initializer
    names (LoRA, adapter) or in tensor names (prompt). ``target_ops`` restricts LoRA/adapter sites by op
    type. ``dropout`` is accepted for config compatibility and must be 0: ONNX training graphs here carry
    no dropout on the adapter path.
    """

    method: str
    targets: tuple[str, ...] = ()
    target_ops: tuple[str, ...] = ()
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    adapter_dim: int = 32
    adapter_activation: str = "gelu"
    num_virtual_tokens: int = 8
    select_patterns: tuple[str, ...] = ()
    head_classes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Lists from TOML/JSON become tuples so the spec stays hashable and immutable.
        for name in ("targets", "target_ops", "select_patterns"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        self.validate()

    # ---- validation that needs no model -------------------------------------------------------
    def validate(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"unknown PEFT method {self.method!r}; expected one of {', '.join(METHODS)}")
        for name in ("rank", "adapter_dim", "num_virtual_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise SpecError(f"alpha must be > 0, got {self.alpha!r}")
        if self.dropout != 0:
            raise SpecError("dropout != 0 is not supported (adapter paths carry no dropout node)")
        if self.adapter_activation not in ADAPTER_ACTIVATIONS:
            raise SpecError(
                f"adapter_activation {self.adapter_activation!r} not in {', '.join(ADAPTER_ACTIVATIONS)}")
        if self.head_classes is not None and (
                isinstance(self.head_classes, bool) or not isinstance(self.head_classes, int)
                or self.head_classes < 2):
            raise SpecError(f"head_classes must be an integer >= 2 or None, got {self.head_classes!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SpecError(f"seed must be an integer, got {self.seed!r}")
        for pattern in (*self.targets, *self.select_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SpecError(f"bad regular expression {pattern!r}: {exc}") from exc
        for op in self.target_ops:
            if op not in LORA_OPS:
                raise SpecError(f"target op {op!r} not supported; expected some of {', '.join(LORA_OPS)}")
        if self.method in ("lora", "ffa_lora", "adapter") and not (self.targets or self.target_ops):
            raise SpecError(f"method {self.method!r} needs targets and/or target_ops")
        if self.method == "select" and not self.select_patterns:
            raise SpecError("method 'select' needs select_patterns")
        if self.method == "head_only" and self.head_classes is None:
            raise SpecError("method 'head_only' needs head_classes (the new head is all that trains)")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / float(self.rank)

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("targets", "target_ops", "select_patterns"):
            out[name] = list(out[name])
        out["alpha"] = float(out["alpha"])
        out["dropout"] = float(out["dropout"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeftSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"a PEFT spec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown PEFT spec keys: {', '.join(unknown)}")
        if "method" not in data:
            raise SpecError("a PEFT spec needs a 'method'")
        kwargs = dict(data)
        if "alpha" in kwargs and isinstance(kwargs["alpha"], int) and not isinstance(kwargs["alpha"], bool):
            kwargs["alpha"] = float(kwargs["alpha"])
        return cls(**kwargs)

    def canonical_json(self) -> str:
        return json.dumps({"spec_version": SPEC_VERSION, **self.to_dict()}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def spec_hash(self, model_sha256: str | None = None) -> str:
        """sha256 hex of the canonical spec (plus the base model's sha256 when given)."""
        payload = self.canonical_json()
        if model_sha256 is not None:
            if not re.fullmatch(r"[0-9a-f]{64}", model_sha256):
                raise SpecError("model_sha256 must be 64 lowercase hex digits")
            payload += "|model:" + model_sha256
        return hashlib.sha256(payload.encode("ascii")).hexdigest()
