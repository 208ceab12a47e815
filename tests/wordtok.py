"""A tiny word-level tokenizer for tests: bAbI words get their own ids, other words share buckets."""

from __future__ import annotations

import re
import zlib

from gma6.data.vocab import DIRECTIONS, OBJECTS, PEOPLE, PLACES, QA5_PEOPLE


class WordTokenizer:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab_size: int = 128) -> None:
        words = sorted({w.lower() for w in PEOPLE + QA5_PEOPLE + PLACES + OBJECTS + DIRECTIONS})
        words += ["where", "is", "?", ".", "answer", ":", "question", "to", "the", "moved", "went"]
        self.vocab = {w: 3 + i for i, w in enumerate(words)}
        self.inverse = {i: w for w, i in self.vocab.items()}
        self.vocab_size = vocab_size
        self.first_free = 3 + len(words)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id(w) for w in re.findall(r"\w+|[^\w\s]", text.lower())]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict:
        """As a fast Hugging Face tokenizer: ids and, when asked, each token's character span."""
        found = list(re.finditer(r"\w+|[^\w\s]", text))
        out = {"input_ids": self.encode(text, add_special_tokens)}
        if return_offsets_mapping:
            out["offset_mapping"] = ([(0, 0)] if add_special_tokens else []) + [m.span() for m in found]
        return out

    def _id(self, word: str) -> int:
        if word in self.vocab:
            return self.vocab[word]
        return self.first_free + zlib.crc32(word.encode()) % (self.vocab_size - self.first_free)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.inverse.get(int(i), "<w>") for i in ids if int(i) > 2 or not skip_special_tokens)
