"""The fine-tuning corpus as labelled documents, each split into training text and held-out sentences.

A document's id is the label every one of its trained tokens carries in the history (the store's
``article`` column): the Wikipedia page id for the gensim Wikipedia sample, the story's line number for
the Lee news corpus, the file's or paragraph's index for a user's text. Held-out sentences are never
trained on; the same-article analysis asks which fine-tuning tokens the model retrieves for them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..probe.corpora import MIN_WORDS, news_documents, sentences, wikipedia_articles

STAND_INS = {
    "wikipedia": "gensim English-Wikipedia sample (enwiki articles 10-30302, shortened; the article is the label)",
    "news": "gensim Lee background news corpus (300 stories; the story is the label)",
}
TITLE_WORDS = 8


@dataclass(frozen=True)
class Document:
    id: int
    title: str
    train_text: str
    heldout: tuple[str, ...]


@dataclass(frozen=True)
class DocumentCorpus:
    spec: str
    description: str
    label: str  # what a document is: "article", "story", "file" or "paragraph"
    documents: tuple[Document, ...]


def _title(text: str) -> str:
    words = text.split()
    return " ".join(words[:TITLE_WORDS]) + (" ..." if len(words) > TITLE_WORDS else "")


def _user_documents(path: Path) -> tuple[str, list[tuple[int, str, list[str]]]]:
    """A folder: one document per file; a file: one per blank-line-separated paragraph."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"--corpus: folder {path} holds no files")
        return "file", [(i, f.name, sentences(f.read_text(encoding="utf-8"))) for i, f in enumerate(files)]
    paragraphs = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return "paragraph", [(i, _title(p), sentences(p)) for i, p in enumerate(paragraphs)]


def split_heldout(parts: list[str], heldout: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences): up to ``heldout`` sentences of >= MIN_WORDS words, never
    all of the document's sentences, drawn with ``rng``; the rest, in order, is trained on."""
    eligible = [i for i, s in enumerate(parts) if len(s.split()) >= MIN_WORDS]
    count = min(heldout, len(eligible), len(parts) - 1)
    chosen = set(rng.sample(eligible, count)) if count > 0 else set()
    return ([s for i, s in enumerate(parts) if i not in chosen], [parts[i] for i in sorted(chosen)])


def load_documents(spec: str, heldout: int = 2, seed: int = 0) -> DocumentCorpus:
    """--corpus: "wikipedia", "news", or a text file / folder, with ``heldout`` sentences held out per
    document. FileNotFoundError for a missing path, ValueError for a corpus without text."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("--corpus must be a non-empty string")
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0:
        raise ValueError(f"--heldout-sentences must be an int >= 0, got {heldout!r}")
    if spec == "wikipedia":
        label, raw = "article", [(pid, title, parts) for title, pid, parts in wikipedia_articles()]
        description = STAND_INS[spec]
    elif spec == "news":
        label, raw = "story", [(i, _title(" ".join(parts)), parts) for i, parts in enumerate(news_documents())]
        description = STAND_INS[spec]
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--corpus: {spec} is neither 'wikipedia', 'news' nor an existing file or folder")
        label, raw = _user_documents(path)
        description = f"text from {path} (a document = a {label})"
    rng = random.Random(seed)
    documents = []
    for doc_id, title, parts in raw:
        if not parts:
            continue
        train, held = split_heldout(parts, heldout, rng)
        documents.append(Document(int(doc_id), title, " ".join(train), tuple(held)))
    if not documents:
        raise ValueError(f"--corpus {spec}: no text to fine-tune on (every document is empty)")
    return DocumentCorpus(spec, description, label, tuple(documents))
