"""The distributed operators (metaclm_ext.distributed) on 2 and 3 gloo processes on localhost.

Each group runs every scenario of tests/distributed_ranks.py in one start (a process start costs
seconds on a shared machine); each test below checks one scenario's outcome on every rank.
"""
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distributed_ranks as ranks
import metaclm_ext
from metaclm_ext.distributed import open_ranks, split_store
from metaclm_ext.distributed.layout import plan_layout
from metaclm_ext.distributed.merge import merge_heaps, sum_in_order
from metaclm_ext.ops import PAD_INDEX, sort_heap_entries
from metaclm_ext.store import HistoryStore, HistoryWriter

WORKER = Path(__file__).with_name("distributed_ranks.py")
START_TIMEOUT_S = 240  # a whole group on a busy 2-core machine: imports dominate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world: int, out: Path, scenario_set: str, store: Path = None) -> list:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    extra = [str(store)] if store else []
    return [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(out), scenario_set,
                              *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)]


def _finish(procs: list, out: Path) -> dict:
    """{rank: outcomes} of the ranks that wrote theirs; process output shown if one did not."""
    deadline = time.monotonic() + START_TIMEOUT_S
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0] + "\n(killed: the group ran past the test's timeout)")
    found = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(len(procs))
             if (out / f"rank{r}.json").exists()}
    return {"outcomes": found, "logs": logs}


def _write_store(path: Path) -> None:
    data = ranks.int_data()
    with HistoryWriter.create(path, fields={"history": (8, "float32"), "inputs": (8, "float32"),
                                            "errors": (3, "float32")},
                              columns={"labels": "int64"}, shard_rows=128) as w:
        w.append({name: data[name].numpy() for name in ("history", "inputs", "errors", "labels")})


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Every group started at once (they share the cores, not a port): 2 and 3 ranks running the
    comparisons (and recordings under DDP), 2 ranks whose last one dies or hangs."""
    root = tmp_path_factory.mktemp("distributed")
    _write_store(root / "store")
    plan = {"main2": (2, "main"), "main3": (3, "main"), "dead": (2, "dead"), "hung": (2, "hung")}
    started = {name: _start(world, root / name, which, root / "store") for name, (world, which) in plan.items()}
    return {name: _finish(procs, root / name) for name, procs in started.items()}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scenario", [s.__name__ for s in ranks.MAIN])
def test_scenario_on_every_rank(groups, world, scenario):
    run = groups[f"main{world}"]
    assert sorted(run["outcomes"]) == list(range(world)), "\n".join(run["logs"])
    for rank, outcomes in run["outcomes"].items():
        assert outcomes[scenario] == "ok", f"rank {rank}:\n{outcomes[scenario]}"


@pytest.mark.parametrize("how", ["dead", "hung"])
def test_a_lost_rank_fails_the_others_naming_the_group(groups, how):
    run = groups[how]
    assert sorted(run["outcomes"]) == [0], "\n".join(run["logs"])
    outcome = run["outcomes"][0][how]
    assert outcome["error"] is not None, "rank 0 got no error"
    assert "process group '0' (gloo, global ranks [0, 1])" in outcome["error"], outcome["error"]
    assert outcome["seconds"] < ranks.GROUP_TIMEOUT_S + 5, outcome


# -- the pieces, in this process ---------------------------------------------------------------------


def test_merge_heaps_is_the_heap_of_all_rows():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(-3, 4, (5, 2, 40), generator=gen).float()  # many ties
    rows = torch.arange(40).expand(5, 2, 40)
    k = 6
    whole = sort_heap_entries(scores, rows)
    parts = []
    for a, b in [(0, 0), (0, 3), (3, 17), (17, 40)]:  # one empty part, parts shorter than k
        keys = torch.full((5, 2, k), float("-inf"))
        idx = torch.full((5, 2, k), PAD_INDEX)
        best = sort_heap_entries(scores[..., a:b], rows[..., a:b])
        n = min(k, b - a)
        keys[..., :n], idx[..., :n] = best[0][..., :n], best[1][..., :n]
        parts.append((keys, idx))
    got = merge_heaps([p[0] for p in parts], [p[1] for p in parts], k)
    assert torch.equal(got[0], whole[0][..., :k]) and torch.equal(got[1], whole[1][..., :k])


def test_sum_in_order_adds_left_to_right():
    parts = [torch.tensor([1e16]), torch.tensor([1.0]), torch.tensor([-1e16])]
    assert float(sum_in_order(parts)) == (1e16 + 1.0) - 1e16


def test_plan_layout():
    assert plan_layout([3, 0, 2], [None] * 3).offsets == [0, 3, 3]
    layout = plan_layout([2, 3, 0], [3, 0, 5])
    assert layout.order == [1, 0, 2] and layout.total == 5
    with pytest.raises(ValueError, match="leaves rows 2..2 to no rank"):
        plan_layout([2, 2], [0, 3])
    with pytest.raises(ValueError, match="overlaps"):
        plan_layout([2, 2], [0, 1])
    with pytest.raises(ValueError, match="on every rank or on none"):
        plan_layout([2, 2], [0, None])
    with pytest.raises(ValueError, match="past the history"):
        plan_layout([2, 0], [0, 9])


def test_split_store_at_shard_boundaries(tmp_path):
    _write_store(tmp_path / "s")
    store = HistoryStore(tmp_path / "s")
    bounds = set(store.shard_starts)
    for world in (1, 2, 3, 7, 20):
        parts = split_store(store, world)
        assert len(parts) == world and parts[0][0] == 0 and parts[-1][1] == len(store)
        assert all(a == b for (_, a), (b, _) in zip(parts, parts[1:]))
        assert all(a in bounds and b in bounds for a, b in parts)
        sizes = [b - a for a, b in parts]
        assert max(sizes) - min(sizes) <= 2 * store.shard_rows if world <= store.num_shards else min(sizes) == 0
    with pytest.raises(ValueError, match="world_size"):
        split_store(store, 0)


def test_store_rows_view(tmp_path):
    _write_store(tmp_path / "s")
    store = HistoryStore(tmp_path / "s")
    part = store.rows(100, 1300)  # inside shards at both ends
    assert len(part) == 1200 and "history" in part
    field = part["history"]
    assert field.shape == (1200, 8)
    want = store.read("history", 100, 1300)
    got = torch.cat([rows for _, rows in field.iter_chunks(77)])
    assert np.array_equal(got.numpy(), want)
    assert [o for o, _ in field.iter_chunks(500)] == [0, 500, 1000]
    assert np.array_equal(field.read(10, 20), store.read("history", 110, 120))
    assert np.array_equal(part["labels"].read(), store.read("labels", 100, 1300))
    assert len(store.rows(5, 5)["labels"].read()) == 0
    with pytest.raises(ValueError, match="start <= stop"):
        store.rows(10, 5)
    with pytest.raises(ValueError, match="start <= stop"):
        field.read(0, 1201)


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs CUDA and NCCL")
def test_nccl_group(tmp_path):
    """One NCCL rank per GPU (NCCL refuses two ranks on one device), up to 2 GPUs."""
    world = min(2, torch.cuda.device_count())
    run = _finish(_start(world, tmp_path, "nccl"), tmp_path)
    assert sorted(run["outcomes"]) == list(range(world)), "\n".join(run["logs"])
    for rank, outcomes in run["outcomes"].items():
        assert outcomes["on_cuda"] == "ok", f"rank {rank}:\n{outcomes['on_cuda']}"


# -- the ranks' stores of a data-parallel recording, as one history ----------------------------------


def _rank_stores(root: Path):
    """Two ranks' stores with uneven steps (rank 1 has no row at step 3) and the single store of the same
    rows in step-major order."""
    gen = torch.Generator().manual_seed(5)
    steps = [np.array([0, 0, 0, 1, 1, 2, 3, 3] * 40), np.array([0, 1, 1, 1, 2, 2, 2, 4] * 40)]
    steps = [np.sort(s) for s in steps]
    spec = dict(fields={"x": (6, "float16")}, columns={"step": "int64", "row": "int64"})
    rows = []
    for rank, s in enumerate(steps):
        batch = {"x": torch.randn(len(s), 6, generator=gen).half().numpy(), "step": s,
                 "row": np.arange(len(s)) + 1000 * rank}
        with HistoryWriter.create(root / f"rank{rank}", shard_rows=50, **spec) as w:
            w.append(batch)
        rows.append(batch)
    order = sorted(((int(st), rank, i) for rank, b in enumerate(rows) for i, st in enumerate(b["step"])))
    merged = {name: np.stack([rows[rank][name][i] for _, rank, i in order]) for name in rows[0]}
    with HistoryWriter.create(root / "single", shard_rows=64, **spec) as w:
        w.append(merged)
    return [root / "rank0", root / "rank1"], root / "single"


def test_open_ranks_is_the_single_store_in_step_major_order(tmp_path):
    paths, single_path = _rank_stores(tmp_path)
    ranks_view, single = open_ranks(paths), HistoryStore(single_path)
    assert len(ranks_view) == len(single) and ranks_view.fields == single.fields
    for name in ("x", "step", "row"):
        want = single.read_tensor(name)
        for chunk_rows in (1, 7, 64, 10_000):
            got = list(ranks_view[name].iter_chunks(chunk_rows))
            assert [o for o, _ in got] == list(range(0, len(single), chunk_rows))
            assert torch.equal(torch.cat([r for _, r in got]), want)
        assert torch.equal(ranks_view[name].read(100, 333), want[100:333])
    steps = ranks_view["step"].read()
    assert bool((steps[1:] >= steps[:-1]).all())
    q = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    got = metaclm_ext.history_topk(q, ranks_view["x"], 4, limit=300, chunk_rows=37)
    want = metaclm_ext.history_topk(q, single["x"], 4, limit=300)
    assert torch.equal(got.top.indices, want.top.indices) and torch.equal(got.last.values, want.last.values)


def test_open_ranks_refuses_stores_that_disagree(tmp_path):
    paths, _ = _rank_stores(tmp_path)
    with HistoryWriter.create(tmp_path / "other", fields={"y": (6, "float16")}, columns={"step": "int64"}) as w:
        w.append({"y": np.zeros((2, 6), np.float16), "step": np.array([0, 1])})
    with pytest.raises(ValueError, match="must record the same modules"):
        open_ranks([paths[0], tmp_path / "other"])
    with HistoryWriter.resume(paths[1]) as w:
        w.update_attrs({"value_scales": {"x": 2.0**10}})
    with pytest.raises(ValueError, match=r"stores its fields times \{'x': 1024.0\}, but .* times \{'x': 1.0\}"):
        open_ranks(paths)
    assert open_ranks([paths[1], paths[1]]).attrs["value_scales"] == {"x": 2.0**10}
    with pytest.raises(TypeError, match="list of store paths"):
        open_ranks(str(paths[0]))
