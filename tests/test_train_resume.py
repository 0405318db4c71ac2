"""`metaclm train --resume`: an interrupted run continues from its last checkpoint into exactly the run an
uninterrupted one trains (weights, losses and every history row), and the run folder's other guarantees."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from metaclm_ext.cli import main
from metaclm_ext.store import HistoryStore, HistoryWriter
from metaclm_ext.training import load_checkpoint, load_run, make_config
from metaclm_ext.training.loop import train

ARGS = ["--preset", "tiny", "--epochs", "30", "--record-history", "--record-errors", "--history-dtype", "float32",
        "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "whole"
    assert main(["train", "--out", str(run), *ARGS]) == 0
    return run


def _assert_same_run(a, b):
    wa, wb = load_checkpoint(a), load_checkpoint(b)
    for (name, pa), (_, pb) in zip(wa.named_parameters(), wb.named_parameters()):
        assert torch.equal(pa, pb), name
    la, lb = load_run(a).losses, load_run(b).losses
    assert la["epoch"] == lb["epoch"] and la["train"] == lb["train"] and la["validation"] == lb["validation"]
    sa, sb = HistoryStore(a / "history"), HistoryStore(b / "history")
    assert len(sa) == len(sb) and sa.fields == sb.fields and sa.columns == sb.columns
    for name in [*sa.fields, *sa.columns]:
        assert np.array_equal(sa.read(name), sb.read(name)), name


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_resumes_into_the_uninterrupted_one(uninterrupted, tmp_path, how):
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "metaclm_ext.cli", "train", "--out", str(run), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    state = run / "checkpoints" / "epoch_0002" / "train_state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(how)
    proc.wait(timeout=120)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    assert not (run / "summary.json").exists()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_run(uninterrupted, run)
    assert json.loads((run / "summary.json").read_text())["steps"] == load_run(run).info["total_steps"]


def test_resume_refuses_a_finished_run_and_other_flags(uninterrupted, capsys):
    assert main(["train", "--resume", str(uninterrupted), "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(uninterrupted), "--lr", "0.5"]) == 2
    assert "--lr" in capsys.readouterr().err


def test_history_path_is_found_from_any_working_directory(uninterrupted, tmp_path, monkeypatch):
    """A run's default history is recorded relative to the run folder, not to where `metaclm train` ran."""
    assert load_run(uninterrupted).config.record_history == "history"
    other = tmp_path / "elsewhere"
    (other / "history").mkdir(parents=True)  # a decoy where the old relative path would have pointed
    monkeypatch.chdir(other)
    assert load_run(uninterrupted).history == uninterrupted / "history"
    assert main(["dualcheck", str(uninterrupted), "--no-progress"]) == 0


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "lr must be a finite"), ("--momentum", "inf", "momentum must be a finite"),
    ("--max-grad-norm", "nan", "max_grad_norm must be a finite"),
    ("--max-train-sequences", "0", "max_train_sequences must be positive"),
    ("--device", "bogus", "device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, capsys, flag, value, message):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), flag, value, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "config.json").exists()


def test_a_history_folder_in_use_is_refused_before_the_run_starts(tmp_path, capsys):
    store = tmp_path / "store"
    HistoryWriter.create(store, {"x": (2, "float32")}).close()
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--record-history", str(store), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert not (run / "config.json").exists()
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0  # the --out is still free


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", "tiny", "--out", str(path), "--no-progress"])
    assert exit_.value.code == 2 and "not a folder" in capsys.readouterr().err
    with pytest.raises(NotADirectoryError, match="not a folder"):  # the library refuses it too
        train(make_config("tiny"), path, progress=False)
