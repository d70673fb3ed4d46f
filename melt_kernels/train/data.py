"""Training data: a synthetic copying task, a token stream, a real text corpus every machine has offline, and the
user's text or JSON lines encoded by a checkpoint's own tokenizer (:class:`Tokenizer`, :func:`read_documents`).

Every source draws a *global* batch from a seeded ``torch.Generator`` on the
CPU: each process of a distributed run draws the same global batch and keeps
its own rows (:func:`shard`), so a run sees the same data in 1 and in N
processes, and the generator's state is all a checkpoint needs to resume it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

IGNORE = -100  # target of positions that carry no task loss (F.cross_entropy's ignore_index)
Batch = tuple[torch.Tensor, torch.Tensor]


class Source(Protocol):
    """What the trainer draws from: (input_ids, targets), both (batch, seq_len) int64 on the CPU."""

    vocab_size: int
    seq_len: int

    def sample(self, batch: int, generator: torch.Generator) -> Batch: ...


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """The contiguous block of rows that process ``rank`` of ``world`` trains on."""
    rows = batch[0].shape[0]
    if rows % world:
        raise ValueError(f"the global batch ({rows} sequences) must be a multiple of the number of processes "
                         f"({world})")
    per = rows // world
    return tuple(t[rank * per:(rank + 1) * per] for t in batch)


@dataclass(frozen=True)
class CopyTask:
    """Copying: ``x1 .. xn SEP x1 .. x(n-1)``, the model predicting the second copy.

    x is drawn uniformly from tokens 0 .. num_symbols-1 and SEP is token
    num_symbols.  The first copy is unpredictable; from SEP on the target is
    the next token of the copy, n positions back, so with chunks of at most n
    tokens it is read from the settled cache of earlier chunks.
    """

    num_symbols: int = 16
    length: int = 8

    def __post_init__(self):
        if self.num_symbols < 2 or self.length < 1:
            raise ValueError(f"need num_symbols >= 2 and length >= 1, got {self}")

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        """(input_ids, targets), both (batch, seq_len) int64, drawn on the CPU from ``generator``."""
        x = torch.randint(self.num_symbols, (batch, self.length), generator=generator)
        ids = torch.cat([x, torch.full((batch, 1), self.num_symbols), x[:, :-1]], dim=1)
        targets = torch.cat([torch.full((batch, self.length), IGNORE), x], dim=1)
        return ids, targets


class TokenStream:
    """Windows of a 1-D token sequence: ``ids = tokens[o : o+L]``, ``targets = tokens[o+1 : o+L+1]``.

    :meth:`sample` draws the offsets o uniformly; :meth:`windows` gives
    evenly spaced, non-overlapping ones (a fixed evaluation set).
    """

    def __init__(self, tokens: torch.Tensor, vocab_size: int, seq_len: int):
        if tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be a 1-D int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if seq_len < 1 or tokens.numel() < seq_len + 1:
            raise ValueError(f"need seq_len >= 1 and more than seq_len tokens, got seq_len={seq_len} and "
                             f"{tokens.numel()} tokens")
        if tokens.numel() and int(tokens.max()) >= vocab_size:
            raise ValueError(f"token {int(tokens.max())} is outside the vocabulary of {vocab_size}")
        self.tokens, self.vocab_size, self.seq_len = tokens, vocab_size, seq_len

    def _at(self, offsets: torch.Tensor) -> Batch:
        index = offsets[:, None] + torch.arange(self.seq_len + 1)
        window = self.tokens[index]
        return window[:, :-1], window[:, 1:]

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        return self._at(torch.randint(self.tokens.numel() - self.seq_len, (batch,), generator=generator))

    def windows(self, count: int) -> Batch:
        """``count`` non-overlapping windows spread evenly over the stream (raises if they do not fit)."""
        span = self.seq_len + 1
        if count < 1 or count * span > self.tokens.numel():
            raise ValueError(f"{count} windows of {span} tokens do not fit in {self.tokens.numel()} tokens")
        stride = self.tokens.numel() // count
        return self._at(torch.arange(count) * stride)


TEXT_SUFFIXES = (".txt", ".jsonl")


def from_file(path: str, vocab_size: Optional[int], seq_len: int,
              tokenizer: Optional["Tokenizer"] = None) -> TokenStream:
    """A :class:`TokenStream` of a ``.npy`` array of token ids (any integer dtype, memory-mapped), of a text
    (``.txt``) or JSON-lines (``.jsonl``, :func:`read_documents`) file's documents encoded by ``tokenizer``, or
    of any other file's bytes (vocabulary 256; also text and JSONL files when no tokenizer is given)."""
    if path.endswith(".npy"):
        import numpy as np
        tokens = torch.from_numpy(np.load(path, mmap_mode="r").astype(np.int64))
        vocab = vocab_size or int(tokens.max()) + 1
    elif tokenizer is not None and path.endswith(TEXT_SUFFIXES):
        tokens = torch.tensor(tokenizer.encode_documents(read_documents(path)), dtype=torch.int64)
        vocab = vocab_size or tokenizer.vocab_size
    else:
        with open(path, "rb") as f:
            tokens = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        vocab = vocab_size or 256
    return TokenStream(tokens, vocab, seq_len)


def split_held_out(stream: TokenStream) -> tuple[TokenStream, TokenStream]:
    """(training, held-out) streams of ``stream``: its last 1/:data:`HELD_OUT_EVERY` of the tokens held out, so
    that a run on the user's data ends with an evaluation on text it never trained on."""
    cut = stream.tokens.numel() - stream.tokens.numel() // HELD_OUT_EVERY
    return (TokenStream(stream.tokens[:cut], stream.vocab_size, stream.seq_len),
            TokenStream(stream.tokens[cut:], stream.vocab_size, stream.seq_len))


# ---------------------------------------------------------------- the user's text, by the teacher's tokenizer


JSONL_FIELDS = ("text", ("prompt", "completion"))  # what a JSON line may hold, in this order of preference


def read_documents(path: str) -> list[str]:
    """The documents of a text file (the whole file, one document) or a JSON-lines file: one object per non-blank
    line, its document its ``"text"`` string or, without one, its ``"prompt"`` and ``"completion"`` strings
    joined (the two common shapes of training data); any other line is an error naming the line."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [f.read()]
        documents = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                documents.append(record["text"])
            elif isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
                documents.append(record["prompt"] + record["completion"])
            else:
                raise ValueError(f"{path}, line {number}: expected an object with a \"text\" string or "
                                 f"\"prompt\" and \"completion\" strings")
        return documents


class Tokenizer:
    """A checkpoint's own tokenizer: ``tokenizer.json`` read by the ``tokenizers`` package, or else whatever
    transformers' ``AutoTokenizer`` loads from the folder.  Documents are joined with the end-of-sequence token
    (``eos_token`` of ``tokenizer_config.json``, or the checkpoint's ``config.json`` ``eos_token_id``) when the
    checkpoint names one, so that a document does not read as the continuation of the one before."""

    def __init__(self, folder: str):
        self.folder = folder
        path = os.path.join(folder, "tokenizer.json")
        try:
            import tokenizers
        except ImportError:
            tokenizers = None
        if tokenizers is not None and os.path.exists(path):
            self.backend = tokenizers.Tokenizer.from_file(path)
            self.vocab_size = self.backend.get_vocab_size()
            self._encode = lambda text: self.backend.encode(text, add_special_tokens=False).ids
            self.eos_id = self._eos_id(lambda token: self.backend.token_to_id(token))
            return
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError(f"tokenizing text needs the tokenizers package (pip install 'melt_kernels[train]') "
                              f"with {path}, or transformers") from None
        self.backend = AutoTokenizer.from_pretrained(folder)
        self.vocab_size = len(self.backend)
        self._encode = lambda text: self.backend(text, add_special_tokens=False)["input_ids"]
        self.eos_id = self.backend.eos_token_id

    def _eos_id(self, token_to_id) -> Optional[int]:
        for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
            file = os.path.join(self.folder, name)
            if not os.path.exists(file):
                continue
            with open(file) as f:
                value = json.load(f).get(key)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                return token_to_id(value)
            if isinstance(value, int):
                return value
        return None

    def encode_documents(self, documents: list[str]) -> list[int]:
        """The documents' token ids in order, each followed by the end-of-sequence id when there is one."""
        ids = []
        for document in documents:
            ids += self._encode(document)
            if self.eos_id is not None:
                ids.append(self.eos_id)
        return ids


# ---------------------------------------------------------------- the standard library's source, as bytes


HELD_OUT_EVERY = 10  # one file in ten (by the hash of its name) is held out


def held_out(name: str) -> bool:
    """Whether file ``name`` (a bare file name such as "argparse.py") is in the held-out split: a fixed hash of the
    name, so a file lands on the same side on every machine and Python version that has it."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0


@dataclass(frozen=True)
class Corpus:
    """The bytes of the split, with what identifies them."""

    train: bytes
    held_out: bytes
    files: tuple[tuple[str, ...], tuple[str, ...]]  # (training files, held-out files)
    root: str

    def describe(self) -> dict:
        return {"source": "Python standard library, top-level *.py files, read as bytes", "root": self.root,
                "split": f"held out: sha256(file name) % {HELD_OUT_EVERY} == 0",
                "train_files": len(self.files[0]), "held_out_files": len(self.files[1]),
                "train_bytes": len(self.train), "held_out_bytes": len(self.held_out),
                "held_out_names": list(self.files[1]),
                "sha256": hashlib.sha256(self.train + b"\0" + self.held_out).hexdigest()}

    def streams(self, seq_len: int) -> tuple[TokenStream, TokenStream]:
        return tuple(TokenStream(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), 256, seq_len)
                     for data in (self.train, self.held_out))


def stdlib_corpus(root: Optional[str] = None) -> Corpus:
    """The top-level ``*.py`` files of Python's standard library (``root``: default this interpreter's), sorted by
    name and concatenated, split by :func:`held_out`.  About 4.7 MB on Python 3.11."""
    root = root or sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py") and os.path.isfile(os.path.join(root, n)))
    if not names:
        raise FileNotFoundError(f"no *.py files in {root}")
    parts: tuple[list[str], list[str]] = ([], [])
    for name in names:
        parts[held_out(name)].append(name)

    def read(group):
        data = []
        for name in group:
            with open(os.path.join(root, name), "rb") as f:
                data.append(f.read())
        return b"".join(data)

    return Corpus(read(parts[0]), read(parts[1]), (tuple(parts[0]), tuple(parts[1])), root)
