"""Token arrays on disk and deterministic batches.

Each corpus + tokenizer pair is encoded once into ``<cache>/datasets/<key>/`` holding
``train.bin`` and ``val.bin`` (raw little-endian token ids, uint16 when the vocabulary
fits, else uint32) and ``meta.json``. The folder is built under a temporary name and
renamed into place, so an interrupted encode leaves nothing half-written.

Batches are a pure function of (seed, split, position): batch ``i`` of a run with seed
``s`` is the same whatever the model, the activation or whether the run was resumed,
so the data position in a checkpoint is just the next batch index.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..utils.io import atomic_dir
from .corpus import Corpus, load_corpus
from .tokenizer import Tokenizer, build_tokenizer, chunk_lines

__all__ = ["Dataset", "prepare_data", "token_dtype"]

_FORMAT_VERSION = 1
_SPLIT_IDS = {"train": 0, "val": 1}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class Dataset:
    train_tokens: np.memmap
    val_tokens: np.memmap
    vocab_size: int
    tokenizer: Tokenizer
    path: Path
    corpus_name: str = ""

    def tokens(self, split: str) -> np.ndarray:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train_tokens if split == "train" else self.val_tokens

    def check_fits(self, seq_len: int) -> None:
        """UserError if either split is too short for one window of seq_len + 1 tokens."""
        for split in ("train", "val"):
            n = len(self.tokens(split))
            if n < seq_len + 2:
                raise UserError(
                    f"corpus {self.corpus_name!r} is too small: its {split} split has {n} tokens, "
                    f"need at least train.seq_len + 2 = {seq_len + 2}; add text or lower train.seq_len"
                )

    def get_batch(self, split: str, seed: int, index: int, batch_size: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index`` of the stream for ``seed``: random windows, a pure function of its arguments."""
        tokens = self.tokens(split)
        high = len(tokens) - seq_len - 1
        if high < 1:
            self.check_fits(seq_len)
        rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])
        starts = rng.integers(0, high + 1, size=batch_size)
        window = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
        window = torch.from_numpy(window)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def batch_iterator(self, split: str, seed: int, batch_size: int, seq_len: int, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Endless deterministic batches starting at position ``start_step`` (resume = same stream)."""
        index = int(start_step)
        while True:
            yield self.get_batch(split, seed, index, batch_size, seq_len)
            index += 1

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int, split: str = "val") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Fixed evaluation windows: non-overlapping, evenly spread over the split.

        Independent of the run's seed, so validation losses of different seeds and
        activations are measured on exactly the same tokens.
        """
        tokens = self.tokens(split)
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < 1:
            self.check_fits(seq_len)
        wanted = min(n_windows, batch_size * max_batches)
        starts = (np.linspace(0, n_windows - 1, wanted).round().astype(np.int64)) * seq_len
        for i in range(0, wanted, batch_size):
            chunk = starts[i : i + batch_size]
            window = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in chunk]))
            yield window[:, :-1].contiguous(), window[:, 1:].contiguous()


def _encode_docs(tokenizer: Tokenizer, docs, handle, dtype: np.dtype) -> int:
    count = 0
    for doc in docs:
        pieces = list(chunk_lines([doc]))
        for ids in tokenizer.encode_batch(pieces):
            arr = np.asarray(ids, dtype=dtype)
            arr.tofile(handle)
            count += arr.size
        np.asarray([tokenizer.eos_id], dtype=dtype).tofile(handle)
        count += 1
    return count


def prepare_data(data_config, cache_dir: Optional[Path] = None) -> Dataset:
    """Load the corpus, build or load the tokenizer, encode once (cached), memory-map."""
    cache_dir = Path(cache_dir) if cache_dir is not None else data_config.resolved_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create cache folder {cache_dir}: {exc.strerror or exc}") from None
    corpus: Corpus = load_corpus(data_config)
    tokenizer = build_tokenizer(data_config, corpus.train_docs, cache_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    key = hashlib.sha256(f"v{_FORMAT_VERSION}|{tokenizer.key}|{corpus.fingerprint()}".encode()).hexdigest()[:24]
    folder = cache_dir / "datasets" / key
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        with atomic_dir(folder) as tmp:
            counts = {}
            for split, docs in (("train", corpus.train_docs), ("val", corpus.val_docs)):
                with open(tmp / f"{split}.bin", "wb") as handle:
                    counts[split] = _encode_docs(tokenizer, docs, handle, dtype)
            meta = {"format": _FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                    "tokenizer": tokenizer.key, "corpus": corpus.name, "n_train": counts["train"], "n_val": counts["val"]}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {}
        for split, n in (("train", meta["n_train"]), ("val", meta["n_val"])):
            arrays[split] = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(int(n),))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"token cache {folder} is damaged ({exc}); delete that folder and rerun") from None
    return Dataset(train_tokens=arrays["train"], val_tokens=arrays["val"], vocab_size=tokenizer.vocab_size,
                   tokenizer=tokenizer, path=folder, corpus_name=corpus.name)
