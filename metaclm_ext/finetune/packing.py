"""The training stream: documents tokenized, each capped and closed by the end-of-text token, packed into
sequences of ``seq_len`` trained positions with the document id of every position.

Sequence i reads stream tokens [i*T, (i+1)*T] (T + 1 tokens, the last one shared with the next sequence),
so every one of its T positions has a next token to predict: one history row per position. Documents are
visited in a seeded random order; a stream shorter than the training budget is repeated (``epochs``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .documents import DocumentCorpus


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor    # [B, T] token ids
    targets: torch.Tensor   # [B, T] the next token of each position
    labels: torch.Tensor    # [B, T] the document id of each input token


@dataclass(frozen=True)
class TrainingStream:
    tokens: torch.Tensor     # [N] one pass over the documents' training text
    labels: torch.Tensor     # [N] document id per token
    order: tuple[int, ...]   # document ids in stream order
    tokens_per_document: dict[int, int]


def token_stream(corpus: DocumentCorpus, tokenizer, document_tokens: int, seed: int = 0) -> TrainingStream:
    """Every document's training text tokenized (no special tokens), cut to ``document_tokens`` and closed
    by the tokenizer's end-of-text token (its beginning-of-text token if it has none), in a seeded random document order."""
    if isinstance(document_tokens, bool) or not isinstance(document_tokens, int) or document_tokens < 1:
        raise ValueError(f"--document-tokens must be an int >= 1, got {document_tokens!r}")
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if end is None:
        raise ValueError("the model's tokenizer has neither an end- nor a beginning-of-text token to separate "
                         "documents")
    docs = [d for d in corpus.documents if d.train_text.strip()]
    random.Random(seed).shuffle(docs)
    tokens, labels, counts = [], [], {}
    for doc in docs:
        ids = tokenizer(doc.train_text, add_special_tokens=False)["input_ids"][:document_tokens] + [end]
        tokens += ids
        labels += [doc.id] * len(ids)
        counts[doc.id] = len(ids)
    if len(tokens) < 2:
        raise ValueError(f"--corpus {corpus.spec}: the training text has fewer than 2 tokens")
    return TrainingStream(torch.tensor(tokens), torch.tensor(labels), tuple(d.id for d in docs), counts)


def batches(stream: TrainingStream, steps: int, batch_size: int, seq_len: int) -> list[Batch]:
    """``steps`` batches of ``batch_size`` x ``seq_len`` positions, read from the stream in order (repeated
    when the stream is shorter than steps * batch_size * seq_len + 1 tokens)."""
    need = steps * batch_size * seq_len + 1
    repeats = -(-need // len(stream.tokens))
    tokens, labels = stream.tokens.repeat(repeats)[:need], stream.labels.repeat(repeats)[:need]
    starts = torch.arange(steps * batch_size) * seq_len
    window = starts[:, None] + torch.arange(seq_len + 1)
    seqs, labs = tokens[window], labels[window[:, :-1]]
    shape = (steps, batch_size, seq_len)
    return [Batch(i, t, l) for i, t, l in zip(seqs[:, :-1].reshape(shape), seqs[:, 1:].reshape(shape),
                                              labs.reshape(shape))]


def epochs_read(stream: TrainingStream, steps: int, batch_size: int, seq_len: int) -> float:
    """How many passes over the stream the training reads."""
    return (steps * batch_size * seq_len + 1) / len(stream.tokens)
