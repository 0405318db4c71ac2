"""Text samples for probing: the gensim stand-ins for Wikitext-103 and 1BW, or the user's own text.

The paper keeps samples of at least 10 words and draws a random subset; so do we. Stand-ins are
always described as stand-ins, never by the real corpus name.
"""
from __future__ import annotations

import bz2
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

MIN_WORDS = 10
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
STAND_INS = {
    "wikipedia": ("gensim enwiki sample (stand-in for Wikitext-103)", "wikitext103"),
    "news": ("gensim Lee background news corpus (stand-in for 1 Billion Words)", "1bw"),
}
PAPER_CORPUS_NAMES = {"wikitext103": "Wikitext-103", "1bw": "1BW"}  # the paper's corpora by paper_key
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@dataclass
class Corpus:
    description: str
    samples: list[str]
    available: int                      # samples of >= MIN_WORDS words before subsampling
    paper_key: str | None = None        # which paper column (wikitext103 / 1bw) a stand-in stands in for
    source: str = field(default="")


def sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences of a paragraph (a simple split on ., ! and ?)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _gensim_file(name: str) -> Path:
    from gensim.test.utils import datapath  # gensim (seconds to import) only for the stand-in corpora

    path = Path(datapath(name))
    if not path.exists():
        raise FileNotFoundError(f"--corpus: gensim's test data file {name} is missing from {path.parent}")
    return path


def wikipedia_articles() -> list[tuple[str, int, list[str]]]:
    """(title, page id, prose sentences) of every article of the gensim Wikipedia sample but redirects."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # gensim only here, as in _gensim_file

    out = []
    with bz2.open(_gensim_file(WIKI_FILE)) as fh:
        for title, text, pid in extract_pages(fh):
            clean = filter_wiki(text)
            if clean.lstrip().upper().startswith("#REDIRECT"):
                continue
            # Lists, tables and image captions leave '|', '=' and '*' behind: keep running prose only.
            out.append((title, int(pid), [s for para in clean.split("\n")
                                          if para.strip() and not re.search(r"[|=*{}\[\]]", para)
                                          for s in sentences(para)]))
    return out


def news_documents() -> list[list[str]]:
    """The sentences of each news story of the Lee background corpus (one story a line)."""
    return [sentences(line) for line in _gensim_file(NEWS_FILE).read_text(encoding="utf-8").splitlines()]


def _wikipedia_texts() -> list[str]:
    return [s for _title, _pid, article in wikipedia_articles() for s in article]


def _news_texts() -> list[str]:
    return [s for story in news_documents() for s in story]


def _file_texts(path: Path) -> list[str]:
    """One sample per non-empty line, as in the Wikitext-103 and 1BW test files."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"--corpus: folder {path} holds no files")
    return [" ".join(line.split()) for f in files for line in f.read_text(encoding="utf-8").splitlines()]


def load_corpus(spec: str, max_samples: int | None = None, seed: int = 0) -> Corpus:
    """Samples of >= 10 words from --corpus; a random subset (kept in corpus order) when above max_samples."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    if spec in STAND_INS:
        description, key = STAND_INS[spec]
        texts = _wikipedia_texts() if spec == "wikipedia" else _news_texts()
        source = WIKI_FILE if spec == "wikipedia" else NEWS_FILE
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--corpus: {spec} is neither 'wikipedia', 'news' nor an existing file or folder")
        description, key, source = f"text from {path}", None, str(path)
        texts = _file_texts(path)
    kept = [t for t in texts if len(t.split()) >= MIN_WORDS]
    if not kept:
        raise ValueError(f"--corpus {spec}: no sample has at least {MIN_WORDS} words")
    chosen = kept
    if max_samples is not None and len(kept) > max_samples:
        chosen = [kept[i] for i in sorted(random.Random(seed).sample(range(len(kept)), max_samples))]
    return Corpus(description, chosen, len(kept), key, source)
