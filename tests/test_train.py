"""`metaclm train` (tiny preset end to end), `--record-history`, and `metaclm dualcheck`'s exactness."""
import json
import math

import numpy as np
import pytest
import torch

from metaclm_ext import data
from metaclm_ext.cli import main
from metaclm_ext.dualcheck import dualcheck
from metaclm_ext.paper import paper_numbers
from metaclm_ext.history_names import field_name
from metaclm_ext.training.history import STORE_COLUMNS as COLUMNS
from metaclm_ext.store import HistoryStore
from metaclm_ext.training import PRESETS, build_model, count_parameters, load_checkpoint, load_run, make_config
from metaclm_ext.training.loop import train


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """The tiny preset with an fp32 history of inputs and errors (3 epochs, 24 sequences)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--record-history", "--record-errors",
                 "--history-dtype", "float32", "--no-progress"]) == 0
    return run


def test_run_folder_layout_and_loading(sgd_run):
    run = load_run(sgd_run)
    assert run.config == make_config("tiny", record_history="history", record_errors=True,
                                     history_dtype="float32")
    assert run.epochs == [0, 1, 2, 3]
    assert run.losses["epoch"] == [1, 2, 3]
    assert all(math.isfinite(v) for v in run.losses["train"] + run.losses["validation"])
    assert len(run.data["train"]) == 24 and len(run.data["validation"]) == 16
    model = load_checkpoint(sgd_run)
    assert not model.training and count_parameters(model) == run.info["parameters"]
    w0, w3 = load_checkpoint(sgd_run, 0), model
    assert not torch.equal(w0.transformer.h[0].mlp.c_proj.weight, w3.transformer.h[0].mlp.c_proj.weight)
    with pytest.raises(FileNotFoundError, match="epoch 9"):
        load_checkpoint(sgd_run, 9)
    summary = json.loads((sgd_run / "summary.json").read_text())
    assert summary["record_seconds"] > 0 and 0 < summary["record_overhead"] < 1


def test_history_rows_are_trained_tokens_times_steps(sgd_run):
    run = load_run(sgd_run)
    store = HistoryStore(sgd_run / "history")
    trained_per_epoch = sum(len(r["text"]) + 1 for r in run.data["train"])  # every position with a next token
    assert len(store) == run.config.epochs * trained_per_epoch
    assert set(store.fields) == {field_name(m, l, s) for l in range(run.config.n_layer) for m in ("attn", "mlp")
                                 for s in ("in", "err")}
    assert store.fields["attn_in.0"] == (64, "float32") and store.fields["mlp_in.5"] == (128, "float32")
    assert store.fields["attn_err.3"] == (64, "float32") and store.fields["mlp_err.3"] == (64, "float32")
    assert set(store.columns) == set(COLUMNS)
    cols = {c: store.read(c) for c in COLUMNS}
    assert np.all(np.diff(cols["step"]) >= 0) and cols["step"].max() + 1 == run.info["total_steps"]
    assert np.array_equal(cols["epoch"], cols["step"] // run.info["steps_per_epoch"] + 1)
    texts = {r["id"]: (r["seed"], data.encode(r["text"])) for r in run.data["train"]}
    for i in range(len(store)):
        seed, ids = texts[int(cols["example"][i])]
        p = int(cols["position"][i])
        assert (cols["token"][i], cols["target"][i], cols["seed"][i]) == (ids[p], ids[p + 1], seed)
    assert np.array_equal(cols["seed_next_token"], cols["seed"] * len(data.VOCAB) + cols["target"])
    # each epoch sees every trained token of every sequence exactly once
    for e in range(1, run.config.epochs + 1):
        pairs = sorted(zip(cols["example"][cols["epoch"] == e], cols["position"][cols["epoch"] == e]))
        assert pairs == sorted((r["id"], p) for r in run.data["train"] for p in range(len(r["text"]) + 1))


@pytest.mark.parametrize("epoch", [1, 3])
def test_dualcheck_exact_for_sgd(sgd_run, epoch):
    report = dualcheck(sgd_run, epoch=epoch, progress=False)
    assert report["exact_setting"] and report["passed"]
    assert len(report["layers"]) == 12
    for r in report["layers"]:
        assert r["relative_error"] < 1e-4, r
        assert r["w0_only_relative_error"] > 1e-2, r  # training moved the outputs: the check can fail


def test_dualcheck_cli_prints_every_layer(sgd_run, capsys):
    assert main(["dualcheck", str(sgd_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and out.count(" attn ") == 6 and out.count(" mlp ") == 6


def test_adamw_is_reported_not_exact(tmp_path, capsys):
    run = tmp_path / "adamw"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--optimizer", "adamw", "--lr", "1e-3",
                 "--weight-decay", "0.1", "--scheduler", "cosine", "--epochs", "2", "--record-history",
                 "--record-errors", "--no-progress"]) == 0
    assert HistoryStore(run / "history").fields["attn_in.0"] == (64, "float16")  # the default store dtype
    assert main(["dualcheck", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NOT exact for adamw" in out
    report = dualcheck(run, progress=False)
    assert report["passed"] is None and not report["exact_setting"]
    assert all(math.isfinite(r["relative_error"]) for r in report["layers"])
    assert report["max_relative_error"] > 1e-4


def test_parameter_count_and_presets_match_the_paper():
    model = build_model(make_config("table5"), n_positions=42)
    assert 200_000 < count_parameters(model) < 210_000  # "about 204 thousand"
    paper = paper_numbers()
    for preset, table in (("table5", "table5_training_section5"), ("table6", "table6_training_section8_1")):
        cfg, ref = make_config(preset), paper[table]
        assert (cfg.lr, cfg.epochs, cfg.optimizer, cfg.max_grad_norm) == (
            ref["learning_rate"], ref["epochs"], ref["optimizer"].lower(), ref["max_grad_norm"])
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_inner, cfg.dropout) == (
            ref["layers"], ref["heads"], ref["hidden"], ref["ffn"], ref["dropout"])
        assert cfg.weight_decay == ref.get("weight_decay", 0.0)
    assert make_config("table6").scheduler == "cosine" and make_config("table5").momentum == 0


def test_bad_input(tmp_path, sgd_run):
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="optimizer"):
        make_config("tiny", optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown config"):
        make_config("tiny", learning_rate=1.0)
    with pytest.raises(ValueError, match="record_history"):
        make_config("tiny", record_errors=True)
    with pytest.raises(ValueError, match="divisible"):
        make_config("tiny", n_head=7)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(make_config("tiny"), sgd_run, progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="epochs up to 3"):
        dualcheck(sgd_run, epoch=7, progress=False)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--optimizer", "lbfgs"]) == 2
    assert sorted(PRESETS) == ["table5", "table6", "tiny"]
