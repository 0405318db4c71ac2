"""`metaclm data`: byte-for-byte reproducibility, the grammar, lengths, vocabulary and Table 2."""
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("exrex", reason="metaclm data needs exrex (absent on the GPU machines' image)")

from metaclm_ext import data  # noqa: E402
from metaclm_ext.cli import main  # noqa: E402
from metaclm_ext.paper import paper_numbers  # noqa: E402


def _bytes(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in data.FILES}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, capsys):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main(["data", "--out", str(tmp_path / name), "--seed", str(seed)]) == 0
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    other = _bytes(tmp_path / "c")
    assert other["train.jsonl"] != _bytes(tmp_path / "a")["train.jsonl"]
    assert other["meta.json"] != _bytes(tmp_path / "a")["meta.json"]


def test_bytes_do_not_depend_on_hash_seed_or_process(tmp_path):
    """exrex and set iteration must not leak PYTHONHASHSEED or global random state into the files."""
    code = ("import random, sys; random.seed(99); from metaclm_ext import data; "
            "data.write(data.generate('small', 7), sys.argv[1])")
    for name, hash_seed in (("p1", "1"), ("p2", "12345")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, env=env, cwd=tmp_path)
    data.write(data.generate("small", 7), tmp_path / "here")
    assert _bytes(tmp_path / "p1") == _bytes(tmp_path / "p2") == _bytes(tmp_path / "here")


@pytest.mark.parametrize("setting", ["small", "large"])
def test_grammar_lengths_vocab_and_splits(setting):
    d = data.generate(setting, 0)
    meta = d["meta"]
    assert len(meta["vocab"]) == len(data.VOCAB) == 28
    assert meta["num_seeds"] == data.SETTINGS[setting]["num_seeds"] == len(meta["seeds"]) == len(set(meta["seeds"]))
    per_seed = defaultdict(list)
    for split in ("train", "validation"):
        assert [r["id"] for r in d[split]] == list(range(len(d[split])))
        for r in d[split]:
            assert re.fullmatch(meta["seeds"][r["seed"]], r["text"]), (r, meta["seeds"][r["seed"]])
            assert data.MIN_LEN <= len(r["text"]) <= data.MAX_LEN
            ids = data.encode(r["text"])
            assert ids[0] == data.BOS and ids[-1] == data.EOS and all(2 <= t < 28 for t in ids[1:-1])
            per_seed[(split, r["seed"])].append(r["text"])
    counts = [len(per_seed[("train", s)]) for s in range(meta["num_seeds"])]
    assert all(data.MIN_PER_SEED <= c <= data.MAX_PER_SEED for c in counts) and len(set(counts)) > 1
    assert len(meta["validation_seeds"]) == data.VAL_SEEDS
    for s in meta["validation_seeds"]:
        val = per_seed[("validation", s)]
        assert len(val) == len(set(val)) == data.VAL_PER_SEED
        assert not set(val) & set(per_seed[("train", s)]), "validation sequences must be unseen"
    assert len(d["validation"]) == data.VAL_SEEDS * data.VAL_PER_SEED
    # Seeds share the alphabet: every letter that occurs is used by at least two seeds.
    seeds_of = defaultdict(set)
    for r in d["train"]:
        for c in r["text"]:
            seeds_of[c].add(r["seed"])
    assert all(len(s) >= 2 for s in seeds_of.values()), {c: s for c, s in seeds_of.items() if len(s) < 2}


def test_table2_prints_paper_values_from_json(tmp_path, capsys):
    paper = paper_numbers()
    main(["data", "--out", str(tmp_path / "d"), "--setting", "small"])
    out = capsys.readouterr().out
    ref = paper["table2_data_sizes"]["synthetic_small"]
    d = data.load(tmp_path / "d")
    assert re.search(rf"train\s+{len(d['train']):,}\s+{ref['train']:,}", out), out
    assert re.search(rf"validation\s+{len(d['validation']):,}\s+{ref['validation']:,}", out), out


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="setting"):
        data.generate("medium")
    with pytest.raises(TypeError, match="seed"):
        data.generate("small", "0")
    with pytest.raises(ValueError, match="a-z"):
        data.encode("abC")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        data.load(tmp_path)


def test_generation_constants_match_table4():
    paper = paper_numbers()
    t4 = paper["table4_data_generation"]
    assert (data.SETTINGS["small"]["num_seeds"], data.SETTINGS["large"]["num_seeds"]) == (t4["num_seeds"], t4["num_seeds_large"])
    assert (data.MIN_PER_SEED, data.MAX_PER_SEED) == (t4["min_sequences_per_seed"], t4["max_sequences_per_seed"])
    assert (data.VAL_SEEDS, data.VAL_PER_SEED) == (t4["validation_seeds"], t4["validation_sequences_per_seed"])
    assert len(data.VOCAB) == t4["vocabulary_size"]
