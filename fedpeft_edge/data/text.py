"""Tokenisation on the device: the Rust ``tokenizers`` package reading ``tokenizer.json`` (no torch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.runtime.errors import InvalidTypeError, MissingDependencyError, ensure

TOKENIZERS_INSTALL = "pip install tokenizers"
# Characters per token budget when pre-cutting long texts; English WordPiece averages 4-5 characters per
# token, so 12 leaves a wide margin (a cut that proves too short is re-encoded in full).
_CHARS_PER_TOKEN_BUDGET = 12
_ASCII_WHITESPACE = " \t\n\r"


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

    def _encode_batch(self, texts: list[str]) -> list[Any]:
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which we never use.
        fast = getattr(self._tokenizer, "encode_batch_fast", None)
        return fast(texts) if fast is not None else self._tokenizer.encode_batch(texts)

    def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
        """``{"input_ids": int64 [N, max_len], "attention_mask": int64 [N, max_len]}`` (C-contiguous)."""
        if isinstance(texts, str):
            raise InvalidTypeError("texts must be a sequence of strings, not a single string")
        texts = list(texts)
        ensure(all(isinstance(t, str) for t in texts), "every text must be a str", raising=InvalidTypeError)
        ensure(
            isinstance(max_len, (int, np.integer)) and max_len >= 2,
            f"max_len must be an int >= 2, got {max_len!r}",
        )
        max_len = int(max_len)
        if not texts:
            empty = np.zeros((0, max_len), dtype=np.int64)
            return {"input_ids": empty, "attention_mask": empty.copy()}
        self._configure(max_len)
        # Long documents (20 Newsgroups has 30k-character posts) are cut at a whitespace well past what
        # max_len tokens can cover. BERT pre-tokenisation splits on whitespace, so the tokens of the
        # complete words before the cut are exactly the first tokens of the full text; a cut row whose
        # encoding is not full (could have used more text) is re-encoded from the full text.
        budget = max_len * _CHARS_PER_TOKEN_BUDGET
        cut = [_cut_at_whitespace(t, budget) for t in texts]
        encodings = self._encode_batch(cut)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        redo = [i for i, t in enumerate(cut) if len(t) < len(texts[i]) and not mask[i, -1]]
        if redo:
            for i, enc in zip(redo, self._encode_batch([texts[i] for i in redo]), strict=True):
                ids[i] = enc.ids
                mask[i] = enc.attention_mask
        return {"input_ids": ids, "attention_mask": mask}


def _cut_at_whitespace(text: str, budget: int) -> str:
    """``text`` up to the first ASCII whitespace at or after ``budget`` characters (whole text if none)."""
    if len(text) <= budget:
        return text
    for pos in range(budget, len(text)):
        if text[pos] in _ASCII_WHITESPACE:
            return text[:pos]
    return text


__all__ = ["TextEncoder"]
