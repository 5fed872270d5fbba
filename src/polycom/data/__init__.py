"""Data: corpora (PTB or local text), tokenizers (byte-level BPE, GPT-2), cached token arrays, batches."""

from .corpus import Corpus, load_corpus
from .dataset import Dataset, prepare_data, token_dtype
from .tokenizer import BPETokenizer, GPT2Tokenizer, Tokenizer, build_tokenizer

__all__ = ["Corpus", "load_corpus", "Dataset", "prepare_data", "token_dtype", "Tokenizer", "BPETokenizer", "GPT2Tokenizer", "build_tokenizer"]
