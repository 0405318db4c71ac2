"""History store: round trips, crash safety (SIGKILL + resume), corruption errors naming the file,
streaming through the ops equal to in-memory, and the peak-memory bound of streaming."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import metaclm_ext
from metaclm_ext import HistoryStore, HistoryWriter, StoreError
from metaclm_ext.cli import main as cli_main
from helpers import small_ints

DOCS = Path(__file__).resolve().parent.parent / "docs" / "history-store.md"
ALL_FIELDS = {"f32": (5, "float32"), "f16": (3, "float16"), "bf16": (4, "bfloat16")}
ALL_COLUMNS = {"step": "int64", "seed": "int32"}


def _batch(gen, start, n, fields=ALL_FIELDS):
    """Rows whose values are random floats; `step` carries the row number, `seed` a small label."""
    batch = {name: torch.randn(n, width, generator=gen) * 100 for name, (width, _) in fields.items()}
    batch["step"] = np.arange(start, start + n, dtype=np.int64) + (1 << 40)  # needs int64
    batch["seed"] = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
    return batch


def _write(path, gen, sizes, shard_rows=16, fields=ALL_FIELDS, columns=ALL_COLUMNS):
    """A store of batches of `sizes` rows; returns the batches concatenated (the expected content)."""
    parts = []
    with HistoryWriter.create(path, fields=fields, columns=columns, shard_rows=shard_rows, attrs={"run": "t"}) as w:
        for n in sizes:
            b = _batch(gen, w.rows, n, fields)
            w.append(b)
            parts.append(b)
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def _as_stored(name, values):
    """What the store should give back for `values` appended to field/column `name` (rounded to its dtype)."""
    dtype = {**{n: d for n, (_, d) in ALL_FIELDS.items()}, **ALL_COLUMNS}[name]
    return torch.as_tensor(values).to(getattr(torch, dtype))


# --------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_every_dtype_across_shard_boundaries(tmp_path, gen):
    sizes = [1, 7, 16, 13, 50, 3, 0, 31]  # odd batches straddling shards of 16 rows, and an empty one
    want = _write(tmp_path / "s", gen, sizes)
    store = HistoryStore(tmp_path / "s")
    n = sum(sizes)
    assert len(store) == n and store.num_shards == -(-n // 16)
    assert store.fields == {"f32": (5, "float32"), "f16": (3, "float16"), "bf16": (4, "bfloat16")}
    assert store.columns == {"step": "int64", "seed": "int32"}
    assert store.attrs == {"run": "t"}
    for name in [*ALL_FIELDS, *ALL_COLUMNS]:
        expected = _as_stored(name, want[name])
        got = store.read_tensor(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
        field = store[name]
        assert field.shape == tuple(expected.shape) and field.dtype == expected.dtype
        chunks = list(field.iter_chunks(5))  # chunks of 5 rows: never aligned with the shards of 16
        assert [o for o, _ in chunks] == list(range(0, n, 5))
        assert torch.equal(torch.cat([c for _, c in chunks]), expected), name
        assert torch.equal(torch.as_tensor(store.read(name, 9, 40)), expected[9:40].float() if name == "bf16" else expected[9:40])
    assert np.array_equal(store.read("bf16", raw=True), expected_bits(want["bf16"]))
    assert store.read("step", 3, 3).shape == (0,)


def expected_bits(values):
    return torch.as_tensor(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_numpy_only_reader_from_the_docs(tmp_path, gen):
    """The reader snippet in docs/history-store.md, run as written, reads what the package reads."""
    code = re.search(r"## Reading a store with numpy alone\s+```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    _write(tmp_path / "s", gen, [20, 21])
    store = HistoryStore(tmp_path / "s")
    for name in [*ALL_FIELDS, *ALL_COLUMNS]:
        assert np.array_equal(namespace["read_history"](tmp_path / "s", name), store.read(name)), name
    flip = tmp_path / "s" / json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"][1]["files"]["f16"]["path"]
    _flip_byte(flip, -3)
    with pytest.raises(ValueError, match="corrupted"):
        namespace["read_history"](tmp_path / "s", "f16")


def test_resume_continues_after_the_last_committed_row(tmp_path, gen):
    path = tmp_path / "s"
    first = _write(path, gen, [20], shard_rows=16)  # one full shard and a partial one of 4 rows
    with HistoryWriter.resume(path) as w:
        assert w.rows == w.committed_rows == 20
        more = _batch(gen, 20, 30)
        w.append(more)
    store = HistoryStore(path)
    assert len(store) == 50 and store.num_shards == 4  # 16 + 16 + 16 + 2: the partial shard was rewritten whole
    assert store.read("step").tolist() == [(1 << 40) + i for i in range(50)]
    assert torch.equal(store.read_tensor("f16")[20:], torch.as_tensor(more["f16"]).half())
    assert sorted(p.name for p in (path / "data" / "f16").iterdir()) == [f"{i:08d}.npy" for i in (0, 2, 3, 4)]


def test_flush_commits_and_a_second_writer_is_refused(tmp_path, gen):
    path = tmp_path / "s"
    w = HistoryWriter.create(path, fields={"x": (2, "float32")}, columns={"step": "int64"}, shard_rows=100)
    w.append({"x": torch.ones(3, 2), "step": [0, 1, 2]})
    assert len(HistoryStore(path)) == 0  # buffered, not committed
    w.flush()
    assert len(HistoryStore(path)) == 3
    with pytest.raises(StoreError, match="another HistoryWriter has .* open"):
        HistoryWriter.resume(path)
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="is closed"):
        w.append({"x": torch.ones(1, 2), "step": [3]})
    HistoryWriter.resume(path).close()  # the lock is released


def test_update_attrs_commits_the_attrs_and_keeps_the_buffered_rows(tmp_path, gen):
    path = tmp_path / "s"
    with HistoryWriter.create(path, fields={"x": (2, "float32")}, columns={"step": "int64"}, shard_rows=100,
                              attrs={"run": "t", "n": 1}) as w:
        w.append({"x": torch.ones(3, 2), "step": [0, 1, 2]})
        w.update_attrs({"n": 2, "value_scales": {"x": 0.5}})
        assert HistoryStore(path).attrs == {"run": "t", "n": 2, "value_scales": {"x": 0.5}}
        assert len(HistoryStore(path)) == 0  # the rows stay buffered
        with pytest.raises(ValueError, match="attrs must be JSON-serialisable"):
            w.update_attrs({"bad": float("nan")})
        with pytest.raises(TypeError, match="attrs must be a dict"):
            w.update_attrs([("n", 3)])
    with HistoryWriter.resume(path) as w:
        w.append({"x": torch.ones(1, 2), "step": [3]})
    store = HistoryStore(path)
    assert len(store) == 4 and store.attrs == {"run": "t", "n": 2, "value_scales": {"x": 0.5}}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(columns={"tok": "int16"}), ValueError, r"column 'tok' dtype must be int32 or int64, got 'int16'"),
        (dict(columns={"tok": "uint32"}), ValueError, r"must be int32 or int64"),
        (dict(fields={"x": (4, "float64")}), ValueError, r"field 'x' dtype must be one of"),
        (dict(fields={"x": (0, "float32")}), ValueError, r"field 'x' width must be a positive int"),
        (dict(fields={"x": 4}), TypeError, r"field 'x' must be \(width, dtype\)"),
        (dict(fields={"../x": (4, "float32")}), ValueError, r"field name '../x' must match"),
        (dict(fields={"x": (4, "float32")}, columns={"x": "int64"}), ValueError, r"name 'x' is used twice"),
        (dict(fields={}, columns={}), ValueError, r"needs at least one field or column"),
        (dict(shard_rows=0), ValueError, r"shard_rows must be positive"),
        (dict(attrs={"f": object()}), ValueError, r"attrs must be JSON-serialisable"),
    ],
)
def test_create_rejects_bad_specs(tmp_path, kwargs, error, match):
    args = dict(fields={"x": (4, "float32")}, columns={"step": "int64"})
    args.update(kwargs)
    with pytest.raises(error, match=match):
        HistoryWriter.create(tmp_path / "s", **args)


def test_create_refuses_a_non_empty_path(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "other.txt").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "s"))):
        HistoryWriter.create(tmp_path / "s", fields={"x": (4, "float32")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HistoryStore(tmp_path / "nothing")
    with pytest.raises(StoreError, match="manifest.json is missing"):
        HistoryStore(tmp_path / "s")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda b: b.pop("step"), ValueError, r"missing \['step'\]"),
        (lambda b: b.update(extra=[1, 2, 3]), ValueError, r"unknown \['extra'\]"),
        (lambda b: b.update(x=torch.ones(3, 5)), ValueError, r"field 'x' must be \[n, 4\], got shape \[3, 5\]"),
        (lambda b: b.update(x=torch.ones(3, 4, dtype=torch.int64)), TypeError, r"field 'x' must hold floats"),
        (lambda b: b.update(x=torch.tensor([[0.0] * 4, [0.0, float("nan"), 0, 0], [0.0] * 4])), ValueError, r"field 'x' row 11 is NaN or Inf"),
        (lambda b: b.update(x=torch.full((3, 4), 1e6)), ValueError, r"row 10 is NaN or Inf \(after conversion to float16\)"),
        (lambda b: b.update(step=[0.5, 1.5, 2.5]), TypeError, r"column 'step' must hold integers"),
        (lambda b: b.update(seed=[0, 2**31, 1]), ValueError, r"column 'seed' has values outside the int32 range"),
        (lambda b: b.update(step=[1, 2]), ValueError, r"different row counts"),
        (lambda b: b.update(step="abc"), TypeError, r"column 'step' must be a tensor or array, got str"),
    ],
)
def test_append_rejects_bad_batches_and_changes_nothing(tmp_path, change, error, match):
    w = HistoryWriter.create(tmp_path / "s", fields={"x": (4, "float16")}, columns={"step": "int64", "seed": "int32"}, shard_rows=4)
    w.append({"x": torch.ones(10, 4), "step": np.arange(10), "seed": np.zeros(10, np.int32)})
    batch = {"x": torch.ones(3, 4), "step": [10, 11, 12], "seed": [0, 0, 0]}
    change(batch)
    with pytest.raises(error, match=match):
        w.append(batch)
    assert w.rows == 10
    w.close()
    assert HistoryStore(tmp_path / "s").read("step").tolist() == list(range(10))


# --------------------------------------------------------------------------------------------------
# Kill and resume

_APPENDER = textwrap.dedent(
    """
    import itertools, sys
    import numpy as np
    from metaclm_ext import HistoryWriter
    path, mode, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "create":
        w = HistoryWriter.create(path, fields={"x": (8, "float32"), "h": (4, "bfloat16")},
                                 columns={"row": "int64"}, shard_rows=97)
    else:
        w = HistoryWriter.resume(path)
    print("start", w.rows, flush=True)
    for n in itertools.cycle([1, 37, 64, 5, 129, 200]):
        if w.rows >= total:
            break
        rows = np.arange(w.rows, min(total, w.rows + n))
        w.append({"x": np.repeat(rows[:, None], 8, 1) * 0.5, "h": np.repeat(rows[:, None] % 256, 4, 1) * 1.0,
                  "row": rows})
        print("committed", w.committed_rows, flush=True)
    w.close()
    print("done", w.rows, flush=True)
    """
)


def _check_rows(path, at_least):
    """Every committed row intact and in place: row r has row == r, x == r / 2, h == r % 256."""
    store = HistoryStore(path)
    n = len(store)
    assert n >= at_least
    store.verify()
    rows = np.arange(n)
    assert np.array_equal(store.read("row"), rows)
    assert np.array_equal(store.read("x"), np.repeat(rows[:, None], 8, 1) * 0.5)
    assert np.array_equal(store.read("h"), np.repeat(rows[:, None] % 256, 4, 1).astype(np.float32))
    return n


# Children run in tmp dirs: `python -c` puts the cwd first on sys.path, and the source checkout has no _C.
def _run_until_killed(path, mode, kill_after_rows):
    """Start the appender and SIGKILL it once it reports `kill_after_rows` more committed rows."""
    child = subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), mode, str(10**9)],
                             stdout=subprocess.PIPE, text=True, cwd=path.parent)
    start = committed = None
    try:
        for line in child.stdout:
            word, value = line.split()
            if word == "start":
                start = int(value)
            elif word == "committed" and int(value) >= start + kill_after_rows:
                committed = int(value)
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert committed is not None, "the appender died before committing enough rows"
    assert child.returncode == -signal.SIGKILL
    return start, committed


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    path = tmp_path / "s"
    _, committed = _run_until_killed(path, "create", 2000)
    n1 = _check_rows(path, committed)
    start, committed = _run_until_killed(path, "resume", 2000)
    assert start == n1  # resumes exactly after the last committed row
    n2 = _check_rows(path, committed)
    total = n2 + 777
    done = subprocess.run([sys.executable, "-c", _APPENDER, str(path), "resume", str(total)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"start {n2}" and done.stdout.splitlines()[-1] == f"done {total}"
    assert _check_rows(path, total) == total
    leftovers = [p for p in (path / "data").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert not leftovers


def test_resume_cleans_up_leftovers_of_a_dead_writer(tmp_path, gen):
    path = tmp_path / "s"
    _write(path, gen, [40])
    stray = [path / "data" / "f16" / "00000009.npy", path / "data" / "step" / "00000009.npy.tmp",
             path / "manifest.json.tmp"]
    for p in stray:
        p.write_bytes(b"junk")
    assert len(HistoryStore(path)) == 40  # readers ignore files the manifest does not list
    HistoryWriter.resume(path).close()
    assert not stray[0].exists() and not stray[1].exists()
    assert len(HistoryStore(path)) == 40


# --------------------------------------------------------------------------------------------------
# Corruption: clear errors naming the file


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(tmp_path, gen):
    """A 3-shard store, its manifest, and the path of the f16 file of shard 1."""
    path = tmp_path / "s"
    _write(path, gen, [40], shard_rows=16)
    manifest = json.loads((path / "manifest.json").read_text())
    return path, manifest, path / manifest["shards"][1]["files"]["f16"]["path"]


def test_truncated_shard(damaged):
    path, _, victim = damaged
    victim.write_bytes(victim.read_bytes()[:-5])
    with pytest.raises(StoreError, match=re.escape(str(victim)) + ".*truncated or overwritten"):
        HistoryStore(path)


def test_flipped_data_byte_is_caught_when_read(damaged):
    path, _, victim = damaged
    _flip_byte(victim, -4)  # a data byte: the header and size still agree
    store = HistoryStore(path)
    with pytest.raises(StoreError, match=re.escape(str(victim)) + " is corrupted: CRC-32"):
        store.read("f16")
    with pytest.raises(StoreError, match=re.escape(str(victim))):
        metaclm_ext.history_topk(torch.randn(2, 3), store["f16"], 3, chunk_rows=7)
    with pytest.raises(StoreError, match=re.escape(str(victim))):
        metaclm_ext.history_topk(torch.randn(2, 3), store["f16"], 3, limit=17)  # stops inside the shard
    with pytest.raises(StoreError, match=re.escape(str(victim))):
        store.verify()
    assert store.read("f16", 0, 16).shape == (16, 3)  # other shards still read
    assert HistoryStore(path, verify=False).read("f16").shape == (40, 3)  # verify=False trusts the bytes


def test_a_shard_is_verified_once_per_store_object(damaged):
    """A shard whose checksum matched is not checked again through the same store object (committed shards
    are immutable); a store opened afresh, and verify(), check it again."""
    path, _, victim = damaged
    store = HistoryStore(path)
    first = store.read("f16")
    _flip_byte(victim, -4)  # behind the open store's back: only a new pass over the bytes can see it
    again = store.read("f16")  # no StoreError: shard 1 was verified by the first read
    assert np.flatnonzero((again.view(np.uint16) != first.view(np.uint16)).any(axis=1)).tolist() == [31]
    with pytest.raises(StoreError, match=re.escape(str(victim)) + " is corrupted: CRC-32"):
        HistoryStore(path).read("f16")
    with pytest.raises(StoreError, match=re.escape(str(victim))):
        store.verify()


def test_flipped_header_byte(damaged):
    path, _, victim = damaged
    _flip_byte(victim, 20)  # inside the header's dict text
    with pytest.raises(StoreError, match=re.escape(str(victim))):
        HistoryStore(path)


def test_missing_shard(damaged):
    path, _, victim = damaged
    victim.unlink()
    with pytest.raises(StoreError, match=re.escape(str(victim)) + " is missing"):
        HistoryStore(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["fields"]["f16"].update(width=6), r"holds float16 \[16, 3\] but the manifest says f16 is float16 \[16, 6\]"),
        (lambda m: m["fields"]["f16"].update(dtype="bfloat16"), r"holds float16 \[16, 3\] but the manifest says f16 is bfloat16"),
        (lambda m: m["columns"]["step"].update(dtype="int32"), r"holds int64 \[16\] but the manifest says step is int32"),
        (lambda m: m["shards"][1].update(rows=15), r"holds float32 \[16, 5\] but the manifest says f32 is float32 \[15, 5\]"),
    ],
)
def test_manifest_disagreeing_with_the_shards(damaged, edit, match):
    path, manifest, _ = damaged
    edit(manifest)
    if manifest["shards"][1]["rows"] == 15:
        manifest["rows"] -= 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard file .*/data/\w+/0000000\d\.npy " + match):
        HistoryStore(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(rows=41), r"rows is 41 but the shards hold 40"),
        (lambda m: m.pop("shards"), r"missing key 'shards'"),
        (lambda m: m.update(version=2), r"version 2 is not supported"),
        (lambda m: m["shards"][0]["files"].pop("seed"), r"shard 0 has files for"),
        (lambda m: m["shards"][0]["files"]["seed"].update(path="../../etc/passwd"), r"leaves the store"),
        (lambda m: m["columns"].update(tok={"dtype": "int16"}), r"column 'tok' dtype must be int32 or int64"),
    ],
)
def test_malformed_manifest(damaged, edit, match):
    path, manifest, _ = damaged
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=re.escape(str(path / "manifest.json")) + " is malformed: .*" + match):
        HistoryStore(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="is not valid JSON"):
        HistoryStore(path)


# --------------------------------------------------------------------------------------------------
# Streaming through the ops equals in memory


@pytest.fixture
def exact_store(tmp_path, gen):
    """Integer-valued data (every score exact, many ties) in shards of 1000 rows; N = 3777."""
    n, shard = 3777, 1000
    data = {
        "attn": small_ints((n, 16), gen, dtype=torch.float16),
        "x": small_ints((n, 8), gen, dtype=torch.bfloat16),
        "e": small_ints((n, 6), gen, dtype=torch.float32),
        "label": torch.randint(0, 5, (n,), generator=gen, dtype=torch.int64),
    }
    data["label32"] = data["label"].to(torch.int32)
    fields = {"attn": (16, "float16"), "x": (8, "bfloat16"), "e": (6, "float32")}
    with HistoryWriter.create(tmp_path / "s", fields=fields, columns={"label": "int64", "label32": "int32"},
                              shard_rows=shard) as w:
        for start in range(0, n, 611):
            w.append({k: v[start : start + 611] for k, v in data.items()})
    return tmp_path / "s", data


@pytest.mark.parametrize("chunk_rows, chunk_bytes, readahead", [(333, None, 2), (None, 40_000, 2), (1024, None, 0), (5000, None, 1)])
def test_streaming_equals_in_memory(exact_store, gen, chunk_rows, chunk_bytes, readahead):
    path, data = exact_store
    store = HistoryStore(path, chunk_bytes=chunk_bytes or (64 << 20), readahead=readahead)
    n = len(store)
    q = small_ints((5, 4, 4), gen)
    limit = torch.tensor([n, 2, 1000, 1001, 2500])
    for lim in (limit, None):
        got = metaclm_ext.history_topk(q, store["attn"], 9, limit=lim, chunk_rows=chunk_rows)
        want = metaclm_ext.history_topk(q, data["attn"], 9, limit=lim)
        for a, b in ((got.top, want.top), (got.last, want.last)):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        for labels in ("label", "label32"):
            got = metaclm_ext.history_label_mass(q, store["attn"], store[labels], 5, limit=lim, chunk_rows=chunk_rows)
            want = metaclm_ext.history_label_mass(q, data["attn"], data["label"], 5, limit=lim)
            assert torch.equal(got, want)
        qx = small_ints((5, 8), gen)
        got = metaclm_ext.dual_form_apply(qx, store["x"], store["e"], limit=lim, chunk_rows=chunk_rows)
        want = metaclm_ext.dual_form_apply(qx, data["x"], data["e"], limit=lim)
        assert torch.equal(got, want)


def test_streaming_random_floats_is_bitwise_identical_with_the_same_chunks(exact_store, gen):
    """Real-valued data: the same chunking gives the same kernels the same rows, so equal bits."""
    path, _ = exact_store
    n = 3777
    hist = torch.randn(n, 64, generator=gen).half()
    with HistoryWriter.create(path.parent / "r", fields={"h": (64, "float16")}, columns={"l": "int32"}, shard_rows=700) as w:
        w.append({"h": hist, "l": torch.arange(n) % 7})
    store = HistoryStore(path.parent / "r")
    q = torch.randn(3, 8, 8, generator=gen)
    got = metaclm_ext.history_topk(q, store["h"], 20, chunk_rows=999)
    want = metaclm_ext.history_topk(q, hist, 20, chunk_rows=999)
    assert torch.equal(got.top.indices, want.top.indices) and torch.equal(got.top.values, want.top.values)
    got = metaclm_ext.history_label_mass(q, store["h"], store["l"], 7, chunk_rows=999)
    assert torch.equal(got, metaclm_ext.history_label_mass(q, hist, torch.arange(n) % 7, 7, chunk_rows=999))


def test_ops_reject_store_fields_of_the_wrong_kind(exact_store):
    path, _ = exact_store
    store = HistoryStore(path)
    with pytest.raises(ValueError, match=r"history must be 2-D \[rows, dim\], got shape \[3777\]"):
        metaclm_ext.history_topk(torch.randn(1, 4), store["label"], 3)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[3777\], got \[3777, 6\]"):
        metaclm_ext.history_label_mass(torch.randn(1, 16), store["attn"], store["e"], 5)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor \[N\] or a HistoryStore column, got list"):
        metaclm_ext.history_label_mass(torch.randn(1, 16), store["attn"], [0] * len(store), 5)
    with pytest.raises(KeyError, match="'nope' is not in store"):
        store["nope"]
    with pytest.raises(ValueError, match=r"stop must be in \[0, N = 3777\]"):
        next(store["attn"].iter_chunks(10, 5000))


class _ShortSource:
    """A broken row source that silently stops 10 rows early."""

    def __init__(self, field):
        self.field, self.shape, self.dtype, self.device = field, field.shape, field.dtype, field.device

    def iter_chunks(self, chunk_rows, stop):
        return self.field.iter_chunks(chunk_rows, stop - 10)


def test_a_short_row_source_is_an_error_not_a_result(exact_store):
    path, _ = exact_store
    store = HistoryStore(path)
    with pytest.raises(RuntimeError, match="row source ended at row 3767, expected 3777"):
        metaclm_ext.history_topk(torch.randn(1, 16), _ShortSource(store["attn"]), 3)
    with pytest.raises(RuntimeError, match=r"row sources went out of step: offsets \{0\}, lengths"):
        metaclm_ext.dual_form_apply(torch.randn(1, 8), store["x"], _ShortSource(store["e"]), chunk_rows=5000)


def test_empty_batches_are_accepted(tmp_path):
    with HistoryWriter.create(tmp_path / "s", fields={"x": (2, "float32")}, columns={"step": "int64"}) as w:
        w.append({"x": torch.empty(0, 2), "step": []})
        w.append({"x": torch.ones(1, 2), "step": [7]})
    assert HistoryStore(tmp_path / "s").read("step").tolist() == [7]


def test_abandoned_and_failing_streams_stop_their_threads(exact_store):
    path, _ = exact_store
    store = HistoryStore(path)
    before = threading.active_count()
    chunks = store["attn"].iter_chunks(100)
    next(chunks)
    assert threading.active_count() == before + 1
    chunks.close()
    assert threading.active_count() == before
    victim = path / json.loads((path / "manifest.json").read_text())["shards"][2]["files"]["attn"]["path"]
    _flip_byte(victim, -1)
    with pytest.raises(StoreError, match=re.escape(str(victim))):
        metaclm_ext.history_label_mass(torch.randn(1, 16), store["attn"], store["label"], 5, chunk_rows=300)
    assert threading.active_count() == before


# --------------------------------------------------------------------------------------------------
# Peak memory of streaming

_MEMORY_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    import torch
    import metaclm_ext
    from metaclm_ext import HistoryStore

    def peak():  # VmHWM (= ru_maxrss, but reset below: ru_maxrss also keeps the peaks of exited threads)
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    path, budget = sys.argv[1], int(sys.argv[2])
    gen = torch.Generator().manual_seed(0)
    q, q1 = torch.randn(4, 4, 8, generator=gen), torch.randn(4, 32, generator=gen)
    small = torch.randn(20000, 32, generator=gen)  # warm up kernels and thread pools in memory
    metaclm_ext.history_topk(q, small, 10)
    metaclm_ext.history_label_mass(q, small, torch.zeros(20000, dtype=torch.int32), 16)
    metaclm_ext.dual_form_apply(q1, small, small[:, :8].contiguous())
    store = HistoryStore(path, chunk_bytes=budget)
    try:  # reset the peak to the current RSS (Linux >= 4.0) so the import peak cannot hide growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    out = {}
    metaclm_ext.history_topk(q, store["x"], 10)
    out["history_topk"] = peak() - base
    metaclm_ext.history_label_mass(q, store["x"], store["label"], 16)
    out["history_label_mass"] = peak() - base
    metaclm_ext.dual_form_apply(q1, store["x"], store["e"])
    out["dual_form_apply"] = peak() - base
    whole = store.read_tensor("x")  # the control: loading the field whole must show up
    out["whole"] = peak() - base
    print(json.dumps(out))
    """
)


def test_peak_memory_is_bounded_by_the_chunk_budget(tmp_path):
    """A 262 MB store streamed with a 16 MiB budget stays under (readahead + 3) * budget + 16 MiB."""
    n, budget = 1_600_000, 16 << 20
    gen = torch.Generator().manual_seed(0)
    with HistoryWriter.create(tmp_path / "s", fields={"x": (32, "float32"), "e": (8, "float32")},
                              columns={"label": "int32"}) as w:
        for start in range(0, n, 200_000):
            w.append({"x": torch.randn(200_000, 32, generator=gen), "e": torch.randn(200_000, 8, generator=gen),
                      "label": torch.randint(0, 16, (200_000,), generator=gen)})
    store = HistoryStore(tmp_path / "s")
    bound = (store.readahead + 3) * budget + (16 << 20)
    field_bytes = n * 32 * 4
    assert field_bytes > 2 * bound  # the store is several times the bound, so the test can fail
    run = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "s"), str(budget)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    peaks = json.loads(run.stdout)
    mib = {k: round(v / 2**20, 1) for k, v in peaks.items()}
    assert peaks["whole"] > field_bytes * 0.9, mib  # the measurement sees a whole-field read
    print("peak extra RSS (MiB):", mib, "bound", bound / 2**20)
    for op in ("history_topk", "history_label_mass", "dual_form_apply"):
        assert peaks[op] <= bound, (op, mib, bound / 2**20)


# --------------------------------------------------------------------------------------------------
# CLI


def test_store_info_cli(tmp_path, gen, capsys):
    _write(tmp_path / "s", gen, [20, 21])
    assert cli_main(["store-info", str(tmp_path / "s"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "rows       41" in out and "shards     3" in out and "field      bf16: [41, 4] bfloat16" in out
    assert "column     seed: [41] int32" in out and "checksums match" in out
    victim = tmp_path / "s" / "data" / "seed" / "00000001.npy"
    _flip_byte(victim, -1)
    assert cli_main(["store-info", str(tmp_path / "s")]) == 0  # without --verify: sizes and headers only
    assert cli_main(["store-info", str(tmp_path / "s"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "1 bad shard file(s)" in err and str(victim) in err


@pytest.mark.parametrize("keep", [0, 1, 6, 7, 8, 13, 20])
def test_truncate_keeps_exactly_the_first_rows_and_appends_after_them(tmp_path, keep):
    x = torch.arange(20 * 3, dtype=torch.float32).reshape(20, 3)
    with HistoryWriter.create(tmp_path / "s", {"x": (3, "float32")}, {"i": "int64"}, shard_rows=7) as w:
        w.append({"x": x[:10], "i": torch.arange(10)})
        w.flush()
        w.append({"x": x[10:], "i": torch.arange(10, 20)})  # 2 full shards committed, 6 rows buffered
        w.truncate(keep)
        assert len(w) == keep
        w.append({"x": -x[:2], "i": torch.tensor([-1, -2])})
    store = HistoryStore(tmp_path / "s")
    assert np.array_equal(store.read("x"), torch.cat([x[:keep], -x[:2]]).numpy())
    assert np.array_equal(store.read("i"), np.concatenate([np.arange(keep), [-1, -2]]))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    on_disk = {f"data/x/{p.name}" for p in (tmp_path / "s" / "data" / "x").iterdir()}
    assert on_disk == {shard["files"]["x"]["path"] for shard in manifest["shards"]}  # dropped shards are deleted
    with HistoryWriter.resume(tmp_path / "s") as w, pytest.raises(ValueError, match="rows must be in"):
        w.truncate(len(store) + 1)
