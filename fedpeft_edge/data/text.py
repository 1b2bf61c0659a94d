"""Tokenisation on the device: the Rust ``tokenizers`` package reading ``tokenizer.json`` (no torch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedpeft_edge.errors import MissingDependencyError, TypeError, ensure

TOKENIZERS_INSTALL = "pip install tokenizers"


class TextEncoder:
    """Fixed-length batch encoding: ``[CLS] tokens [SEP]`` truncated/padded to ``max_len``.

    Gives the same ids as the Hugging Face fast tokenizer built from the same ``tokenizer.json`` called with
    ``truncation=True, padding="max_length", max_length=max_len``.
    """

    def __init__(self, tokenizer_json: str | os.PathLike[str], *, threads: int | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingDependencyError(
                f"tokenising text needs `tokenizers`; install it with `{TOKENIZERS_INSTALL}`"
            ) from exc
        path = Path(tokenizer_json)
        ensure(path.is_file(), f"tokenizer file not found: {path}")
        if threads is not None:
            # The Rust pool reads this once, at its first parallel call; keep devices from oversubscribing.
            os.environ.setdefault("RAYON_NUM_THREADS", str(int(threads)))
        self.path = path
        self._tokenizer = Tokenizer.from_file(str(path))
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self.pad_token_id = 0 if pad_id is None else int(pad_id)
        self._configured_len: int | None = None

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def _configure(self, max_len: int) -> None:
        if self._configured_len == max_len:
            return
        self._tokenizer.enable_truncation(max_length=max_len)
        self._tokenizer.enable_padding(length=max_len, pad_id=self.pad_token_id, pad_token="[PAD]")
        self._configured_len = max_len

    def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
        """``{"input_ids": int64 [N, max_len], "attention_mask": int64 [N, max_len]}`` (C-contiguous)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        texts = list(texts)
        ensure(all(isinstance(t, str) for t in texts), "every text must be a str", raising=TypeError)
        ensure(
            isinstance(max_len, (int, np.integer)) and max_len >= 2,
            f"max_len must be an int >= 2, got {max_len!r}",
        )
        max_len = int(max_len)
        if not texts:
            empty = np.zeros((0, max_len), dtype=np.int64)
            return {"input_ids": empty, "attention_mask": empty.copy()}
        self._configure(max_len)
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask}


__all__ = ["TextEncoder"]
