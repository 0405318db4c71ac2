"""`metaclm data`: the synthetic regex language of the paper's Appendix D, sampled with exrex.

Grammar (documented in docs/train.md):
  * A shared pool of ``2 * num_seeds`` *pieces* over the 26 letters a-z. A piece is a literal of 1-3
    letters (``kq``), a class of 2-4 letters (``[aeg]``) or an alternation of two 1-3 letter literals
    (``(ab|xyz)``), followed by one quantifier from ``'' {0,1} {1,2} {2,3}``.
  * A seed (one "task") is the concatenation of 4-6 pieces drawn from the shared pool, so seeds share the
    alphabet and their building blocks: no single character tells the seed apart.
  * A sequence is one exrex sample of a seed with MIN_LEN..MAX_LEN letters (resampled otherwise); its
    tokens are ``<bos> letters <eos>``.
Everything comes from one ``random.Random(seed)``; exrex's module-level ``choice``/``randint`` are pointed at
it while sampling, and the files are written with fixed key order, so one seed gives identical bytes.
"""
from __future__ import annotations

import contextlib
import json
import random
import string
from pathlib import Path
from typing import Iterator

import exrex

from .paper import paper_numbers

LETTERS = string.ascii_lowercase
SPECIALS = ["<bos>", "<eos>"]
VOCAB = SPECIALS + list(LETTERS)  # 28 tokens, as in the paper's Table 4
BOS, EOS = 0, 1
PAD = EOS  # padding positions are masked (attention mask 0, label -100), so any id would do
MIN_LEN, MAX_LEN = 8, 40  # letters per sequence
SETTINGS = {  # Table 4: seeds 10 (small) / 50 (large); 10..60 sequences per seed; validation 10 seeds x 20
    "small": {"num_seeds": 10},
    "large": {"num_seeds": 50},
}
MIN_PER_SEED, MAX_PER_SEED = 10, 60
VAL_SEEDS, VAL_PER_SEED = 10, 20
FILES = ("train.jsonl", "validation.jsonl", "meta.json")


def encode(text: str) -> list[int]:
    """Token ids of one sequence: <bos>, its letters, <eos>."""
    bad = sorted(set(text) - set(LETTERS))
    if bad:
        raise ValueError(f"text may only contain a-z, got {bad}")
    return [BOS] + [len(SPECIALS) + LETTERS.index(c) for c in text] + [EOS]


@contextlib.contextmanager
def _exrex_rng(rng: random.Random) -> Iterator[None]:
    """Point exrex's module-level choice/randint at ``rng`` (exrex has no RNG argument)."""
    saved = exrex.choice, exrex.randint
    exrex.choice, exrex.randint = rng.choice, rng.randint
    try:
        yield
    finally:
        exrex.choice, exrex.randint = saved


def _literal(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))


def _piece(rng: random.Random) -> str:
    kind = rng.choice(["literal", "class", "alternation"])
    if kind == "literal":
        body = _literal(rng)
        body = f"({body})" if len(body) > 1 else body
    elif kind == "class":
        body = "[" + "".join(sorted(rng.sample(LETTERS, rng.randint(2, 4)))) + "]"
    else:
        body = f"({_literal(rng)}|{_literal(rng)})"
    return body + rng.choice(["", "{0,1}", "{1,2}", "{2,3}"])


def _make_seeds(rng: random.Random, num_seeds: int, need: int) -> tuple[list[str], list[str]]:
    """A shared piece pool and ``num_seeds`` distinct seeds; a seed is kept only if ``4 * need`` samples give
    ``need`` distinct strings of MIN_LEN..MAX_LEN letters (so each seed's language is large enough)."""
    pool = [_piece(rng) for _ in range(2 * num_seeds)]
    seeds: list[str] = []
    for _ in range(1000 * num_seeds):
        if len(seeds) == num_seeds:
            return pool, seeds
        seed = "".join(rng.choice(pool) for _ in range(rng.randint(4, 6)))
        if seed in seeds:
            continue
        texts = {t for t in (exrex.getone(seed) for _ in range(4 * need)) if MIN_LEN <= len(t) <= MAX_LEN}
        if len(texts) >= need:
            seeds.append(seed)
    raise RuntimeError("could not draw enough distinct seeds; widen the grammar")  # pragma: no cover


def _sample(rng: random.Random, seed: str, count: int, exclude: set) -> list[str]:
    """``count`` distinct strings of ``seed`` with MIN_LEN..MAX_LEN letters, none in ``exclude``."""
    out: list[str] = []
    for _ in range(200 * count):
        if len(out) == count:
            return out
        text = exrex.getone(seed)
        if MIN_LEN <= len(text) <= MAX_LEN and text not in exclude and text not in out:
            out.append(text)
    raise RuntimeError(f"seed {seed!r} has too few strings of {MIN_LEN}..{MAX_LEN} letters")


def generate(setting: str = "small", seed: int = 0) -> dict:
    """The dataset as plain Python data: {"train": [...], "validation": [...], "meta": {...}}.

    Rows are {"id", "seed", "text"}; validation uses VAL_SEEDS of the training seeds (all of them in the
    small setting) with sequences unseen in training.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    num_seeds = SETTINGS[setting]["num_seeds"]
    rng = random.Random(seed)
    with _exrex_rng(rng):
        pool, seeds = _make_seeds(rng, num_seeds, MAX_PER_SEED + VAL_PER_SEED)
        val_seeds = sorted(rng.sample(range(num_seeds), min(VAL_SEEDS, num_seeds)))
        train, validation = [], []
        for s, regex in enumerate(seeds):
            texts = _sample(rng, regex, rng.randint(MIN_PER_SEED, MAX_PER_SEED), set())
            train += [{"id": len(train) + i, "seed": s, "text": t} for i, t in enumerate(texts)]
            if s in val_seeds:
                texts = _sample(rng, regex, VAL_PER_SEED, set(texts))
                validation += [{"id": len(validation) + i, "seed": s, "text": t} for i, t in enumerate(texts)]
    meta = {
        "setting": setting, "rng_seed": seed, "vocab": VOCAB, "bos": BOS, "eos": EOS, "pad": PAD,
        "min_len": MIN_LEN, "max_len": MAX_LEN, "num_seeds": num_seeds, "seeds": seeds, "piece_pool": pool,
        "validation_seeds": val_seeds, "stats": stats(train, validation),
    }
    return {"train": train, "validation": validation, "meta": meta}


def stats(train: list[dict], validation: list[dict]) -> dict:
    """Table 2's instance counts plus token counts (instances = sequences)."""
    def one(rows):
        lengths = [len(r["text"]) for r in rows]
        return {"sequences": len(rows), "letters": sum(lengths), "min_letters": min(lengths),
                "max_letters": max(lengths), "seeds": len({r["seed"] for r in rows})}
    return {"train": one(train), "validation": one(validation)}


def write(data: dict, out: Path) -> None:
    """Write train.jsonl, validation.jsonl and meta.json (fixed key order: identical bytes per seed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        lines = [json.dumps(r, sort_keys=True) + "\n" for r in data[split]]
        (out / f"{split}.jsonl").write_text("".join(lines))
    (out / "meta.json").write_text(json.dumps(data["meta"], sort_keys=True, indent=1) + "\n")


def load(folder: Path) -> dict:
    """Read a dataset folder written by :func:`write` (clear errors on missing files)."""
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"dataset folder {folder} has no {name} (make it with `metaclm data`)")
    data = {"meta": json.loads((folder / "meta.json").read_text())}
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl") as f:
            data[split] = [json.loads(line) for line in f if line.strip()]
    return data


def table2(data: dict) -> str:
    """Table 2 (instances per split) beside the paper's values from paper-numbers.json."""
    setting = data["meta"]["setting"]
    ref = paper_numbers()["table2_data_sizes"][f"synthetic_{setting}"]
    lines = [f"Table 2 (synthetic {setting}): instances = sequences", f"{'set':<12}{'ours':>8}{'paper':>8}"]
    for split, key in (("train", "train"), ("validation", "validation")):
        lines.append(f"{split:<12}{len(data[split]):>8,}{ref[key]:>8,}")
    return "\n".join(lines)
