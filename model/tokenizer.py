"""Byte-level BPE tokenizer: a thin wrapper over Hugging Face `tokenizers`.

Byte-level means every string (and every byte sequence) is encodable with no unknown token: the
256 byte values are the initial alphabet and merges only ever join them. Nothing is added by a
post-processor; the data pipeline appends the end-of-text id between documents itself, and text
that happens to contain the literal string "<|endoftext|>" is encoded as ordinary text, so a
document can never forge a document boundary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.shards import atomic_write

EOT = "<|endoftext|>"
EOT_NAMES = (
    EOT,
    "<|end_of_text|>",
    "</s>",
)  # end-of-text in our tokenizers, Llama 3's, Llama 2's / Mistral's
N_BYTES = 256


def _byte_of_char() -> dict[str, int]:
    """Char -> byte of the ByteLevel mapping: printable bytes stand for themselves, the other bytes
    (controls, space, ...) take the chars from U+0100 on, in byte order (GPT-2's convention)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(N_BYTES) if b not in printable]
    table = {chr(b): b for b in printable} | {chr(N_BYTES + n): b for n, b in enumerate(others)}
    if set(table) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("tokenizers' ByteLevel alphabet changed: update _byte_of_char")
    return table


_BYTE_OF_CHAR = _byte_of_char()


class Tokenizer:
    """A byte-level BPE tokenizer with exact byte decoding and a content hash."""

    def __init__(self, backend: _HFTokenizer):
        self.backend = backend
        self.backend.encode_special_tokens = True  # special tokens in text are just text
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        specials = sorted(i for i, tok in added.items() if tok.special)
        eot = next((i for name in EOT_NAMES if (i := backend.token_to_id(name)) is not None), None)
        if eot is None and not specials:
            raise ValueError(f"tokenizer has no end-of-text token: add {EOT!r} as a special token")
        self._eot_id = eot if eot is not None else specials[0]
        self._special = set(specials)
        self._bytes = self._token_bytes(added)

    def _token_bytes(self, added: dict) -> list[bytes]:
        """The exact bytes of every id: added tokens are their UTF-8 text, others map char -> byte."""
        out = []
        for i in range(self.vocab_size):
            if i in added:
                out.append(added[i].content.encode())
                continue
            token = self.backend.id_to_token(i)
            try:
                out.append(bytes(_BYTE_OF_CHAR[c] for c in token))
            except (KeyError, TypeError):
                raise ValueError(
                    f"token {i} ({token!r}) is not byte-level: only byte-level BPE tokenizers are supported"
                ) from None
        return out

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOT,)
    ) -> Tokenizer:
        """Learn merges on `texts`; deterministic (identical input -> byte-identical JSON)."""
        minimum = N_BYTES + len(special_tokens)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: it must be at least {minimum} "
                f"({N_BYTES} byte tokens + {len(special_tokens)} special tokens)"
            )
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read one tokenizer.json."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a tokenizers JSON file: {e}") from None
        return cls(backend)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (a reader never sees a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, [self.backend.to_str(pretty=True).encode()])

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts on all cores (tokenizers' Rust thread pool)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; a multi-byte character cut by the ends shows as U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes of `ids`, e.g. for streaming output that may split a UTF-8 character."""
        table = self._bytes
        return b"".join(table[i] for i in ids)

    def text_bytes(self) -> list[int]:
        """How many bytes of text each id stands for, special tokens 0 (end-of-text is no text): what bits
        per byte divides by."""
        return [0 if i in self._special else len(b) for i, b in enumerate(self._bytes)]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """End-of-text id: the first of EOT_NAMES the vocabulary has, else the first special token."""
        return self._eot_id

    @cached_property
    def sha256(self) -> str:
        """Hash of the canonical JSON: equal for equal tokenizers however they were saved.

        Computed once: a tokenizer is not meant to change after it is trained or loaded.
        """
        canonical = json.dumps(
            json.loads(self.backend.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()
