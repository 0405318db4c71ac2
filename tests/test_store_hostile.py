"""History store against hostile files and failing disks: FIFOs, symlinks out of the store, an append
whose commit fails, two creators racing, a reader racing a writer's commit, manifests that recurse or
have the wrong types. Every outcome is a StoreError (or a correct read), never a hang, a lost or
duplicated row, or a file deleted outside the store."""
import errno
import json
import os
import sys
import threading

import numpy as np
import pytest

from metaclm_ext import HistoryStore, HistoryWriter, StoreError
from metaclm_ext.store import reader as store_reader
from metaclm_ext.store import writer as store_writer
from helpers import run_with_timeout

FIELDS = {"x": (3, "float32")}
COLUMNS = {"step": "int64"}


def _rows(start, n):
    return {"x": np.arange(start * 3, (start + n) * 3, dtype=np.float32).reshape(n, 3),
            "step": np.arange(start, start + n, dtype=np.int64)}


def _store(path, sizes=(5, 4), shard_rows=4):
    with HistoryWriter.create(path, FIELDS, COLUMNS, shard_rows=shard_rows) as w:
        for n in sizes:
            w.append(_rows(w.rows, n))
    return sum(sizes)


def _in_thread(fn, timeout=10):
    """fn()'s result on a thread, or its exception re-raised; a failure if it is still running after `timeout`."""
    outcome = run_with_timeout(fn, timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# --------------------------------------------------------------------------------------------------
# Non-regular files and symlinks


def _replace_with_fifo(path):
    path.unlink()
    os.mkfifo(path)


def test_a_fifo_manifest_is_an_error_not_a_hang(tmp_path):
    _store(tmp_path / "s")
    _replace_with_fifo(tmp_path / "s" / "manifest.json")
    with pytest.raises(StoreError, match=r"manifest .*manifest.json is not a regular file"):
        _in_thread(lambda: HistoryStore(tmp_path / "s"))


def test_a_fifo_shard_is_an_error_not_a_hang(tmp_path):
    _store(tmp_path / "s")
    shard = sorted((tmp_path / "s" / "data" / "x").glob("*.npy"))[0]
    _replace_with_fifo(shard)
    with pytest.raises(StoreError, match=rf"shard file .*{shard.name} is not a regular file"):
        _in_thread(lambda: HistoryStore(tmp_path / "s"))


def test_store_info_on_a_fifo_manifest_exits_2(tmp_path, capsys):
    from metaclm_ext.cli import main

    _store(tmp_path / "s")
    _replace_with_fifo(tmp_path / "s" / "manifest.json")
    assert _in_thread(lambda: main(["store-info", str(tmp_path / "s")])) == 2
    assert "metaclm store-info: error: manifest" in capsys.readouterr().err


def _symlink_data_out(tmp_path):
    """A store whose data/x folder is a symlink to a folder outside it, holding a .npy file of someone else."""
    _store(tmp_path / "s")
    outside = tmp_path / "outside"
    (tmp_path / "s" / "data" / "x").rename(outside)
    (tmp_path / "s" / "data" / "x").symlink_to(outside)
    victim = outside / "precious.npy"
    np.save(victim, np.arange(3))
    return victim


def test_resume_refuses_a_symlinked_data_folder_and_deletes_nothing(tmp_path):
    victim = _symlink_data_out(tmp_path)
    with pytest.raises(StoreError, match=r"data folder .*data/x leaves the store"):
        HistoryWriter.resume(tmp_path / "s")
    assert victim.exists()


def test_reader_refuses_shards_outside_the_store(tmp_path):
    _symlink_data_out(tmp_path)
    with pytest.raises(StoreError, match=r"shard folder .*data/x leaves the store"):
        HistoryStore(tmp_path / "s")


def test_reader_refuses_a_symlinked_shard(tmp_path):
    _store(tmp_path / "s")
    shard = sorted((tmp_path / "s" / "data" / "x").glob("*.npy"))[0]
    copy = tmp_path / "s" / "data" / "copy.npy"
    shard.rename(copy)
    shard.symlink_to(copy)
    with pytest.raises(StoreError, match=r"is a symlink"):
        HistoryStore(tmp_path / "s")


# --------------------------------------------------------------------------------------------------
# A commit that fails, two creators, a reader racing a commit


@pytest.mark.parametrize("failing", ["write_manifest", "write_atomic", "fsync_dir"])
@pytest.mark.parametrize("sizes", [(3, 6), (2, 11), (0, 4)])  # the failing append fills one or several shards
def test_an_append_whose_commit_fails_can_be_retried_without_duplicates(tmp_path, monkeypatch, failing, sizes):
    real = getattr(store_writer, failing)
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    first, second = sizes
    w = HistoryWriter.create(tmp_path / "s", FIELDS, COLUMNS, shard_rows=4)
    w.append(_rows(0, first))
    w.flush()
    before = (w.rows, w.committed_rows)
    monkeypatch.setattr(store_writer, failing, fail_once)
    with pytest.raises(OSError, match="No space left"):
        w.append(_rows(first, second))
    assert (w.rows, w.committed_rows) == before
    w.append(_rows(first, second))  # the retry, once space is free again
    w.close()
    store = HistoryStore(tmp_path / "s")
    n = first + second
    assert len(store) == n
    np.testing.assert_array_equal(store.read("step"), np.arange(n))
    np.testing.assert_array_equal(store.read("x"), _rows(0, n)["x"])
    assert not list((tmp_path / "s").rglob("*.tmp"))  # a failed write leaves no temporary file behind


def test_a_failed_flush_leaves_the_rows_buffered(tmp_path, monkeypatch):
    w = HistoryWriter.create(tmp_path / "s", FIELDS, COLUMNS, shard_rows=8)
    w.append(_rows(0, 3))
    real = store_writer.write_manifest
    monkeypatch.setattr(store_writer, "write_manifest", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        w.flush()
    monkeypatch.setattr(store_writer, "write_manifest", real)
    w.close()
    np.testing.assert_array_equal(HistoryStore(tmp_path / "s").read("step"), np.arange(3))


def test_two_creators_racing_never_erase_committed_rows(tmp_path, monkeypatch):
    """The second creator passes the emptiness check before the first one commits: it must still refuse."""
    path = tmp_path / "s"
    first_has_committed = threading.Event()
    second_checked = threading.Event()
    real_check_specs = store_writer.check_specs

    def check_specs_then_wait(fields, columns):  # runs after the emptiness check that precedes the lock
        if threading.current_thread().name == "second":
            second_checked.set()
            first_has_committed.wait(10)
        return real_check_specs(fields, columns)

    monkeypatch.setattr(store_writer, "check_specs", check_specs_then_wait)
    outcome = {}

    def second():
        try:
            with HistoryWriter.create(path, FIELDS, COLUMNS, shard_rows=4) as w:
                w.append(_rows(0, 1))
            outcome["second"] = "created"
        except (FileExistsError, StoreError) as exc:
            outcome["second"] = exc

    t = threading.Thread(target=second, name="second")
    t.start()
    assert second_checked.wait(10)
    with HistoryWriter.create(path, FIELDS, COLUMNS, shard_rows=4) as w:
        w.append(_rows(0, 6))
    first_has_committed.set()
    t.join(10)
    assert isinstance(outcome["second"], FileExistsError), outcome
    np.testing.assert_array_equal(HistoryStore(path).read("step"), np.arange(6))


def _commit_after_manifest_loads(monkeypatch, writer, which_loads):
    """Make the writer commit one more row right after the reader's manifest loads numbered `which_loads`
    (1 = the first), i.e. between the reader's manifest read and its checks of the shard files."""
    real_load = store_reader.load_manifest
    calls = {"n": 0}

    def load_then_commit(root):
        loaded = real_load(root)
        calls["n"] += 1
        if which_loads(calls["n"]):
            writer.append(_rows(writer.rows, 1))
            writer.flush()  # rewrites the partial shard under a new id and deletes the old files
        return loaded

    monkeypatch.setattr(store_reader, "load_manifest", load_then_commit)
    return calls


def _partial_store(path):
    w = HistoryWriter.create(path, FIELDS, COLUMNS, shard_rows=64)
    w.append(_rows(0, 3))
    w.flush()
    return w


def test_a_reader_racing_a_commit_reads_the_new_manifest(tmp_path, monkeypatch):
    w = _partial_store(tmp_path / "s")
    calls = _commit_after_manifest_loads(monkeypatch, w, lambda n: n == 1)
    store = HistoryStore(tmp_path / "s")
    assert calls["n"] == 3  # the stale manifest, the comparison, the new one
    np.testing.assert_array_equal(store.read("step"), np.arange(4))
    w.close()


def test_a_store_that_keeps_changing_is_a_store_error(tmp_path, monkeypatch):
    w = _partial_store(tmp_path / "s")
    _commit_after_manifest_loads(monkeypatch, w, lambda n: n % 2 == 1)  # before every file check
    with pytest.raises(StoreError, match="changed while it was being opened"):
        HistoryStore(tmp_path / "s")
    w.close()


# --------------------------------------------------------------------------------------------------
# Manifests that recurse or have the wrong types


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * (sys.getrecursionlimit() + 100) + "]" * (sys.getrecursionlimit() + 100), "not valid JSON"),
        ("[1, 2]", "top level must be an object"),
        ("7", "top level must be an object"),
        ('"manifest"', "top level must be an object"),
    ],
)
def test_manifest_that_is_not_an_object(tmp_path, text, match):
    _store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match=match):
        HistoryStore(tmp_path / "s")


def _edit(path, change):
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["shards"][0]["files"]["x"].update(path=7),
        lambda m: m["shards"][0]["files"]["x"].update(path=["data", "x"]),
        lambda m: m["shards"][0]["files"]["x"].update(path=""),
        lambda m: m["shards"][0]["files"]["x"].update(bytes=True),
        lambda m: m["shards"][0].update(rows=True),
        lambda m: m["shards"][0].update(id=[1]),
        lambda m: m.update(shards={"0": 1}),
        lambda m: m.update(fields=[["x", 3]]),
        lambda m: m.update(attrs=[1]),
        lambda m: m["shards"][0].update(files=7),
        lambda m: m["fields"]["x"].update(width=[3]),
        lambda m: m["fields"].update(x=None),
    ],
)
def test_manifest_with_wrong_types_is_a_store_error(tmp_path, change):
    _store(tmp_path / "s")
    _edit(tmp_path / "s" / "manifest.json", change)
    with pytest.raises(StoreError):
        HistoryStore(tmp_path / "s")
