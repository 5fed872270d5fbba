import importlib.util
import os

import numpy as np
import pytest
import torch

from polycom.cli import main
from polycom.config import DataConfig
from polycom.data import load_corpus, prepare_data
from polycom.data import tokenizer as tokenizer_module
from polycom.errors import UserError
from polycom.utils.io import atomic_dir, atomic_write_text


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ptb(cache):
    return prepare_data(DataConfig(max_train_chars=200000, max_val_chars=40000, vocab_size=512), cache)


def test_ptb_tokens_memmap_uint16_and_cached(ptb, cache):
    assert isinstance(ptb.train_tokens, np.memmap) and ptb.train_tokens.dtype == np.uint16
    assert ptb.vocab_size == 512 and int(ptb.train_tokens.max()) < 512
    assert len(ptb.train_tokens) > 30000 and len(ptb.val_tokens) > 5000
    text = ptb.tokenizer.decode(ptb.train_tokens[:50].tolist())
    assert text.startswith(" aer banknote berlitz")
    stamp = os.path.getmtime(ptb.path / "train.bin")
    again = prepare_data(DataConfig(max_train_chars=200000, max_val_chars=40000, vocab_size=512), cache)
    assert again.path == ptb.path and os.path.getmtime(again.path / "train.bin") == stamp  # reused, not re-encoded
    assert len(list((cache / "tokenizers").glob("*.json"))) == 1
    other = prepare_data(DataConfig(max_train_chars=100000, max_val_chars=40000, vocab_size=512), cache)
    assert other.path != ptb.path  # a different corpus slice is a different cache entry


def test_batches_deterministic_from_seed_and_position(ptb):
    a = ptb.get_batch("train", seed=1, index=5, batch_size=4, seq_len=16)
    b = ptb.get_batch("train", seed=1, index=5, batch_size=4, seq_len=16)
    c = ptb.get_batch("train", seed=2, index=5, batch_size=4, seq_len=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted by one
    it = ptb.batch_iterator("train", seed=1, batch_size=4, seq_len=16, start_step=5)
    assert torch.equal(next(it)[0], a[0])
    assert torch.equal(next(it)[0], ptb.get_batch("train", 1, 6, 4, 16)[0])
    e1 = [x for x, _ in ptb.eval_batches(4, 16, 3)]
    e2 = [x for x, _ in ptb.eval_batches(4, 16, 3)]
    assert len(e1) == 3 and all(torch.equal(p, q) for p, q in zip(e1, e2))


def _write_docs(folder, n=20):
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"marker{i:02d} " + "the quick brown fox jumps over the lazy dog. " * 20 + "\n")


def test_local_folder_split_by_whole_documents(tmp_path):
    _write_docs(tmp_path / "docs")
    corpus = load_corpus(DataConfig(corpus=str(tmp_path / "docs"), val_fraction=0.2))
    assert len(corpus.val_docs) == 4 and len(corpus.train_docs) == 16
    marks = lambda docs: {d.split()[0] for d in docs}
    assert not marks(corpus.val_docs) & marks(corpus.train_docs)
    again = load_corpus(DataConfig(corpus=str(tmp_path / "docs"), val_fraction=0.2))
    assert again.val_docs == corpus.val_docs  # fixed split
    globbed = load_corpus(DataConfig(corpus=str(tmp_path / "docs" / "doc1*.txt"), val_fraction=0.2))
    assert len(globbed.train_docs) + len(globbed.val_docs) == 10


def test_single_file_split_at_blank_lines(tmp_path, cache):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"paragraph {i}: " + "words and more words here. " * 10 for i in range(40)))
    corpus = load_corpus(DataConfig(corpus=str(path), val_fraction=0.1))
    assert len(corpus.val_docs) == 4 and all(d.startswith("paragraph") for d in corpus.val_docs)
    ds = prepare_data(DataConfig(corpus=str(path), vocab_size=300), cache)
    assert len(ds.val_tokens) > 0 and ds.train_tokens[-1] == ds.tokenizer.eos_id


def test_gpt2_tokenizer_offline(cache):
    if importlib.util.find_spec("whisper") is None or importlib.util.find_spec("tiktoken") is None:
        pytest.skip("openai-whisper / tiktoken not installed")
    ds = prepare_data(DataConfig(tokenizer="gpt2", max_train_chars=20000, max_val_chars=5000), cache)
    assert ds.vocab_size == 50257 and ds.train_tokens.dtype == np.uint16
    assert ds.tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids
    import sys
    assert "whisper" not in sys.modules, "the BPE file must be found without importing whisper"


def test_gpt2_missing_package_is_clear(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install"):
        tokenizer_module.gpt2_ranks_path()


def test_atomic_writers_leave_nothing_half_written(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "f.txt", "one")
    atomic_write_text(tmp_path / "f.txt", "two")
    assert (tmp_path / "f.txt").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writers_give_normal_permissions(tmp_path, umask):
    import stat

    from polycom.utils.io import atomic_save_torch, atomic_write_bytes, atomic_write_json

    old = os.umask(umask)
    try:
        files = [atomic_write_text(tmp_path / "t.txt", "x"), atomic_write_bytes(tmp_path / "b.bin", b"x"),
                 atomic_write_json(tmp_path / "j.json", {}), atomic_save_torch(tmp_path / "m.pt", {"a": 1})]
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a.bin").write_bytes(b"x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plaindir").mkdir()
    finally:
        os.umask(old)
    for path in files:  # not mkstemp's 0600: what open() gives
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode), path
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask == stat.S_IMODE((tmp_path / "plaindir").stat().st_mode)


def _bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "small.txt").write_text("just a few words\n\nand another\n")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "latin1.txt").write_bytes(("caf\xe9 " * 400).encode("latin-1"))
    (tmp_path / "emptydir").mkdir()
    return {
        "missing": (str(tmp_path / "nope.txt"), "does not exist"),
        "empty": (str(tmp_path / "empty.txt"), "empty"),
        "small": (str(tmp_path / "small.txt"), "too small"),
        "binary": (str(tmp_path / "binary.bin"), "binary"),
        "non-utf8": (str(tmp_path / "latin1.txt"), "not valid UTF-8"),
        "empty folder": (str(tmp_path / "emptydir"), "no files"),
        "glob": (str(tmp_path / "*.nothing"), "no files match"),
    }


def test_bad_corpus_inputs_exit_2_one_line_nothing_cached(tmp_path, capsys):
    cache = tmp_path / "cache"
    for name, (corpus, needle) in _bad_inputs(tmp_path).items():
        rc = main(["train", "--config", "tiny", "--set", f"data.corpus={corpus}", "train.num_threads=1", "--out", str(tmp_path / "run" / name.replace(" ", "_")),
                   "--cache-dir", str(cache), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (name, err)
        assert err.startswith("error:") and "\n" not in err and needle in err, (name, err)
        assert not (tmp_path / "run" / name.replace(" ", "_")).exists(), name  # no empty run folder left behind
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == [], leftovers


def test_corpus_too_small_for_sequence_length(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("\n".join(f"line {i} of a short corpus with some words" for i in range(40)))
    rc = main(["train", "--config", "tiny", "--set", f"data.corpus={path}", "data.vocab_size=300", "train.seq_len=128",
               "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "too small" in err and "train.seq_len" in err and "\n" not in err
