"""The CLI's error boundary: every failure is one line `metaclm COMMAND: error: ...` and exit 2 (bad input) or
exit 1 (the machine), never a traceback (METACLM_DEBUG=1 shows it); and the run-folder inputs behind the
errors that used to escape (an --out that is a file, --device bogus, a config without its key, a checkpoint
that disagrees with its run)."""
import errno
import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

from metaclm_ext import boundary
from metaclm_ext.cli import main
from metaclm_ext.commands import store_info
from metaclm_ext.training import load_checkpoint, load_run, make_config, resolve_device
from metaclm_ext.training.loop import train



def _metaclm(*argv, env=None):
    """`python -m metaclm_ext.cli ARGV` in a fresh process, run outside the source tree so that it imports
    the installed package as the tests do: (exit code, stderr)."""
    done = subprocess.run([sys.executable, "-m", "metaclm_ext.cli", *map(str, argv)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, cwd=tempfile.gettempdir())
    return done.returncode, done.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    train(make_config("tiny", epochs=1, max_train_sequences=8, max_validation_sequences=4), run, progress=False)
    return run


def _copy_run(run, dest):
    import shutil

    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize("argv, match", [
    (["train", "--preset", "tiny", "--out", "{file}"], "is a file, not a folder"),
    (["train", "--preset", "tiny", "--out", "{file}/run"], "is a file, not a folder"),
    (["knn", "{tmp}", "--out", "{file}"], "is a file, not a folder"),
    (["reproduce", "--out", "{file}"], "is a file, not a folder"),
    (["train", "--preset", "tiny", "--out", "{tmp}/run", "--device", "bogus"], "device must be auto, cpu, cuda"),
    (["store-info", "{file}"], "is not a directory"),
    (["store-info", "{tmp}/absent"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, match):
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    code, err = _metaclm(*(a.format(file=file, tmp=tmp_path) for a in argv))
    assert code == 2, err
    assert "Traceback" not in err and match in err
    assert err.strip().splitlines()[-1].startswith(f"metaclm {argv[0]}: error:"), err


def _failing_store_info(exc):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc, code, match", [
    (OSError(errno.ENOSPC, "No space left on device"), 1, "OSError: [Errno 28] No space left on device"),
    (MemoryError(), 1, "MemoryError: MemoryError"),
    (RuntimeError("CUDA error: an illegal memory access\nmore lines"), 1, "RuntimeError: CUDA error: an illegal memory access (a failure"),
    (PermissionError(errno.EACCES, "Permission denied"), 2, "Permission denied"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), 2, "Not a directory"),
    (FileExistsError(errno.EEXIST, "File exists"), 2, "File exists"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_failures_are_classified_and_one_line(tmp_path, monkeypatch, capsys, exc, code, match):
    monkeypatch.setattr(store_info, "main", _failing_store_info(exc))
    assert main(["store-info", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("metaclm store-info: ")


def test_metaclm_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(store_info, "main", _failing_store_info(OSError(errno.EIO, "Input/output error")))
    monkeypatch.setenv(boundary.DEBUG_VARIABLE, "1")
    with pytest.raises(OSError, match="Input/output error"):
        main(["store-info", str(tmp_path)])
    code, err = _metaclm("store-info", tmp_path / "absent", env={boundary.DEBUG_VARIABLE: "1"})
    assert code == 1 and "Traceback" in err and "FileNotFoundError" in err


def test_resolve_device_names_the_choices():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'bogus'"):
        resolve_device("bogus")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("edit, match", [
    (lambda info: info.pop("config"), "has no key 'config'"),
    (lambda info: info["config"].update(bogus=1), "not a valid run config"),
    (lambda info: info["config"].update(n_layer=-2), "n_layer must be positive"),
    (lambda info: info.pop("n_positions"), "has no key 'n_positions'"),
    (lambda info: info.update(config=[1, 2]), "not a valid run config"),
])
def test_a_run_config_without_its_keys_is_a_value_error(tiny_run, tmp_path, edit, match):
    run = _copy_run(tiny_run, tmp_path / "run")
    info = json.loads((run / "config.json").read_text())
    edit(info)
    (run / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=match):
        load_run(run)
    code, err = _metaclm("knn", run)
    assert code == 2 and "Traceback" not in err and "config.json" in err, err


@pytest.mark.parametrize("key, value", [("n_layer", 100000), ("n_embd", 4096), ("vocab_size", 7), ("n_positions", 3)])
def test_a_checkpoint_that_disagrees_with_its_run_is_refused_before_it_is_built(tiny_run, tmp_path, key, value):
    run = _copy_run(tiny_run, tmp_path / "run")
    config = run / "checkpoints" / "epoch_0001" / "config.json"
    saved = json.loads(config.read_text())
    saved[key] = value
    config.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=rf"does not belong to run .*{key} = {value}"):
        load_checkpoint(run)
    assert load_checkpoint(run, epoch=0).config.n_layer == load_run(run).config.n_layer


def test_a_pickled_checkpoint_is_never_loaded(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    folder = run / "checkpoints" / "epoch_0001"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"a pickle someone left here")
    with pytest.raises((OSError, ValueError, EnvironmentError), match="safetensors"):
        load_checkpoint(run)


@pytest.mark.parametrize("flag", ["--rows", "--queries", "--heads", "--head-dim", "--k"])
def test_demo_checks_its_sizes_before_printing_anything(flag, capsys):
    assert main(["demo", flag, "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{flag} must be >= 1, got 0" in err
