"""Tokenizers: a byte-level BPE trained on the corpus (cached), or GPT-2's BPE (offline).

``bpe``: Hugging Face ``tokenizers`` byte-level BPE trained on the TRAIN split only, with
``<|endoftext|>`` as id 0 (document separator). Cached as JSON under
``<cache>/tokenizers/<key>.json``, key = sha256 of corpus train text + settings.

``gpt2``: GPT-2's 50257-token BPE through ``tiktoken``, with the ranks file that ships in
the ``openai-whisper`` package (``whisper/assets/gpt2.tiktoken``). The file is located
with ``importlib.util.find_spec`` without importing whisper (whose import pulls heavy
dependencies); ``tiktoken.get_encoding`` would try to download and fails offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import List, Sequence

from ..errors import UserError
from ..utils.io import atomic_write_text

__all__ = ["Tokenizer", "BPETokenizer", "GPT2Tokenizer", "build_tokenizer", "gpt2_ranks_path", "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"
_BPE_VERSION = "bytelevel-bpe-v1"  # bump when training settings change, invalidates caches
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """Common interface: ``encode``, ``encode_batch``, ``decode``, ``vocab_size``, ``eos_id``, ``key``."""

    name: str = ""
    key: str = ""  # identifies the exact vocabulary (part of the token cache key)
    vocab_size: int = 0
    eos_id: int = 0

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class BPETokenizer(Tokenizer):
    name = "bpe"

    def __init__(self, hf_tokenizer, key: str):
        self._tok = hf_tokenizer
        self.key = key
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eos_id = hf_tokenizer.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    @classmethod
    def train(cls, train_docs: Sequence[str], vocab_size: int, cache_dir: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        h = hashlib.sha256(f"{_BPE_VERSION}|vocab={vocab_size}".encode())
        for doc in train_docs:
            h.update(doc.encode("utf-8"))
            h.update(b"\x00")
        key = f"bpe{vocab_size}-{h.hexdigest()[:20]}"
        path = Path(cache_dir) / "tokenizers" / f"{key}.json"
        if path.is_file():
            try:
                return cls(HFTokenizer.from_file(str(path)), key)
            except Exception:  # a corrupt cache entry is rebuilt, not fatal
                pass
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(chunk_lines(train_docs), trainer=trainer)
        atomic_write_text(path, tok.to_str())
        return cls(tok, key)


def chunk_lines(docs: Sequence[str], lines_per_chunk: int = 2000):
    """Pieces of ~lines_per_chunk whole lines (keeps BPE training and batch encoding in bounded memory)."""
    for doc in docs:
        lines = doc.splitlines(keepends=True)
        for i in range(0, len(lines), lines_per_chunk):
            yield "".join(lines[i : i + lines_per_chunk])


def gpt2_ranks_path() -> Path:
    """whisper/assets/gpt2.tiktoken, found without importing whisper."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.tokenizer=gpt2 needs the GPT-2 BPE file from 'openai-whisper'; install it with: pip install --no-deps openai-whisper tiktoken")
    for location in spec.submodule_search_locations:
        path = Path(location) / "assets" / "gpt2.tiktoken"
        if path.is_file():
            return path
    raise UserError("data.tokenizer=gpt2: openai-whisper is installed but whisper/assets/gpt2.tiktoken is missing; reinstall openai-whisper")


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"

    def __init__(self):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise UserError("data.tokenizer=gpt2 needs 'tiktoken'; install it with: pip install tiktoken") from None
        path = gpt2_ranks_path()
        ranks = load_tiktoken_bpe(str(path))
        self._enc = tiktoken.Encoding(name="gpt2-offline", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: len(ranks)})
        self.vocab_size = self._enc.n_vocab
        self.eos_id = len(ranks)
        self.key = "gpt2-" + hashlib.sha256(path.read_bytes()).hexdigest()[:20]

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


def build_tokenizer(data_config, train_docs: Sequence[str], cache_dir: Path) -> Tokenizer:
    if data_config.tokenizer == "gpt2":
        return GPT2Tokenizer()
    if data_config.tokenizer == "bpe":
        return BPETokenizer.train(train_docs, data_config.vocab_size, cache_dir)
    raise UserError(f"invalid value for data.tokenizer: {data_config.tokenizer!r} (allowed: bpe, gpt2)")


def describe(tokenizer: Tokenizer) -> str:
    return json.dumps({"name": tokenizer.name, "key": tokenizer.key, "vocab_size": tokenizer.vocab_size})
