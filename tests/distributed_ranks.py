"""One rank of the gloo process groups that tests/test_distributed.py starts.

    python tests/distributed_ranks.py RANK WORLD PORT OUT_DIR SCENARIO_SET [STORE]

Runs the scenarios of SCENARIO_SET ("main": every comparison with the single-process operators and the
errors every rank must raise; "dead"/"hung": the last rank dies/stops answering before the operator;
"nccl": the comparison on CUDA tensors over NCCL) and writes each one's
outcome ("ok", or the failure) to OUT_DIR/rank<RANK>.json. Every rank builds the same data from fixed
seeds and computes the single-process answer on the whole history itself, so it can compare on its own.
"""
import contextlib
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaclm_ext  # noqa: E402
from helpers import assert_selection_equal, dual_form_scale, label_mass_scale, small_ints  # noqa: E402
from metaclm_ext import distributed as mdist  # noqa: E402
from metaclm_ext.recording import HistoryRecorder  # noqa: E402
from metaclm_ext.store.scales import true_units  # noqa: E402
from metaclm_ext.store import HistoryStore  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

GROUP_TIMEOUT_S = 10  # how long a collective waits for a dead rank; the tests assert the bound
N, HEADS, HEAD_DIM, K, LABELS, D_OUT, Q = 2000, 2, 4, 5, 7, 3, 14


def cuts(world: int) -> list[int]:
    """Uneven parts; with 3 ranks rank 0 holds none."""
    return {1: [0, N], 2: [0, 700, N], 3: [0, 0, 1234, N]}[world]


def limits(world: int) -> torch.Tensor:
    """Limits at, around and between every rank boundary, and at 0 and N."""
    points = sorted({0, 1, 5, N - 1, N, *(c + d for c in cuts(world) for d in (-1, 0, 1))})
    points = [p for p in points if 0 <= p <= N]
    return torch.tensor((points * Q)[:Q], dtype=torch.int64)


def int_data(dtype=torch.float32):
    """Integer-valued history, queries, labels, inputs and errors: every sum is exact, scores tie often."""
    gen = torch.Generator().manual_seed(7)
    return {
        "history": small_ints((N, HEADS * HEAD_DIM), gen, dtype=dtype),
        "queries": small_ints((Q, HEADS, HEAD_DIM), gen),
        "labels": torch.randint(0, LABELS, (N,), generator=gen),
        "inputs": small_ints((N, HEADS * HEAD_DIM), gen, dtype=dtype),
        "errors": small_ints((N, D_OUT), gen, dtype=dtype),
        "dual_queries": small_ints((Q, HEADS * HEAD_DIM), gen),
    }


def float_data():
    gen = torch.Generator().manual_seed(11)
    return {
        "history": torch.randn(N, HEADS * HEAD_DIM, generator=gen),
        "queries": torch.randn(Q, HEADS, HEAD_DIM, generator=gen),
        "labels": torch.randint(0, LABELS, (N,), generator=gen),
        "inputs": torch.randn(N, HEADS * HEAD_DIM, generator=gen),
        "errors": torch.randn(N, D_OUT, generator=gen),
        "dual_queries": torch.randn(Q, HEADS * HEAD_DIM, generator=gen),
    }


def single_process(data, limit, **kw):
    return (
        metaclm_ext.history_topk(data["queries"], data["history"], K, limit=limit, **kw),
        metaclm_ext.history_label_mass(data["queries"], data["history"], data["labels"], LABELS, limit=limit, **kw),
        metaclm_ext.dual_form_apply(data["dual_queries"], data["inputs"], data["errors"], limit=limit, **kw),
    )


def distributed(data, limit, start, stop, row_offset=None, **kw):
    part = {name: data[name][start:stop] for name in ("history", "labels", "inputs", "errors")}
    return (
        mdist.history_topk(data["queries"], part["history"], K, limit=limit, row_offset=row_offset, **kw),
        mdist.history_label_mass(data["queries"], part["history"], part["labels"], LABELS, limit=limit,
                                 row_offset=row_offset, **kw),
        mdist.dual_form_apply(data["dual_queries"], part["inputs"], part["errors"], limit=limit,
                              row_offset=row_offset, **kw),
    )


def assert_bitwise(got, want):
    for g, w in zip(got[0], want[0]):
        assert_selection_equal(g, w)
    assert torch.equal(got[1], want[1]), (got[1] - want[1]).abs().max()
    assert torch.equal(got[2], want[2]), (got[2] - want[2]).abs().max()


def my_part(rank, world):
    c = cuts(world)
    return c[rank], c[rank + 1]


# -- scenarios ---------------------------------------------------------------------------------------


def integers_uneven(rank, world, where):
    data = int_data()
    for limit in (limits(world), None, N // 2):
        assert_bitwise(distributed(data, limit, *my_part(rank, world)), single_process(data, limit))


def integers_fp16_small_chunks(rank, world, where):
    data, limit = int_data(torch.float16), limits(world)
    got = distributed(data, limit, *my_part(rank, world), chunk_rows=64)
    assert_bitwise(got, single_process(data, limit, chunk_rows=64))


def random_floats(rank, world, where):
    data, limit = float_data(), limits(world)
    got, want = distributed(data, limit, *my_part(rank, world)), single_process(data, limit)
    for g, w in zip(got[0], want[0]):  # scores are distinct: the same rows with the same fp32 scores
        assert_selection_equal(g, w)
    scale = label_mass_scale(data["queries"], data["history"])
    assert bool(((got[1].double() - want[1].double()).abs() <= 1e-6 * scale).all())
    scale = dual_form_scale(data["dual_queries"], data["inputs"], data["errors"])
    assert bool(((got[2].double() - want[2].double()).abs() <= 1e-6 * scale).all())


def random_floats_every_scan(rank, world, where):
    """Top-k of random floats through each scan of the kernel (heads of 8 dims: query vectors; 64: the
    int8 screen; others: row vectors): the same rows with the same fp32 scores as one process."""
    gen = torch.Generator().manual_seed(13)
    start, stop = my_part(rank, world)
    for heads, head_dim in ((3, 5), (4, 8), (1, 64)):
        history = torch.randn(N, heads * head_dim, generator=gen).half()
        queries = torch.randn(Q, heads, head_dim, generator=gen)
        got = mdist.history_topk(queries, history[start:stop], K, limit=limits(world))
        want = metaclm_ext.history_topk(queries, history, K, limit=limits(world))
        for g, w in zip(got, want):
            assert_selection_equal(g, w)


def offsets_out_of_rank_order(rank, world, where):
    """Rank r holds the part world-1-r: parts are merged in global row order, not rank order."""
    data, limit = int_data(), limits(world)
    start, stop = my_part(world - 1 - rank, world)
    assert_bitwise(distributed(data, limit, start, stop, row_offset=start), single_process(data, limit))


def answer_on_rank_0_only(rank, world, where):
    data, limit = int_data(), limits(world)
    got = distributed(data, limit, *my_part(rank, world), dst=0)
    if rank == 0:
        assert_bitwise(got, single_process(data, limit))
    else:
        assert got == (None, None, None), got


def store_row_ranges(rank, world, where):
    """Each rank streams only its shards of one store (split_store); the answer is the whole store's."""
    whole = HistoryStore(where["store"])
    start, stop = mdist.split_store(whole, world)[rank]
    part = whole.rows(start, stop)
    data = int_data()
    limit = limits(world)
    got = (mdist.history_topk(data["queries"], part["history"], K, limit=limit),
           mdist.history_label_mass(data["queries"], part["history"], part["labels"], LABELS, limit=limit),
           mdist.dual_form_apply(data["dual_queries"], part["inputs"], part["errors"], limit=limit))
    want = single_process({**data, **{n: whole[n] for n in ("history", "labels", "inputs", "errors")}}, limit)
    assert_bitwise(got, want)


def expect_error(kind, text, call):
    """`call` must raise `kind` with `text` in its message on this rank, soon."""
    began = time.monotonic()
    try:
        call()
    except kind as exc:
        assert text in str(exc), f"{text!r} not in {str(exc)!r}"
        assert time.monotonic() - began < GROUP_TIMEOUT_S / 2, "the error took as long as a timeout"
        return str(exc)
    raise AssertionError(f"no {kind.__name__} raised")


def nan_rows_name_the_first_global_row(rank, world, where):
    data = int_data()
    data["history"][650] = float("nan")  # rank 0 with 2 ranks, rank 1 with 3
    data["history"][1500] = float("inf")  # the last rank
    data["errors"][1300] = float("nan")
    single = expect_error(ValueError, "history row 650 contains NaN or Inf",
                          lambda: metaclm_ext.history_topk(data["queries"], data["history"], K))
    start, stop = my_part(rank, world)
    expect_error(ValueError, single, lambda: distributed(data, None, start, stop))
    expect_error(ValueError, "errors row 1300 contains NaN or Inf", lambda: mdist.dual_form_apply(
        data["dual_queries"], data["inputs"][start:stop], data["errors"][start:stop]))


def bad_input_on_one_rank(rank, world, where):
    data = int_data()
    start, stop = my_part(rank, world)
    history = data["history"][start:stop]
    wrong = history.to(torch.int32) if rank == world - 1 else history
    expect_error(TypeError, f"failed on rank {world - 1} of {world}: history must be a float tensor",
                 lambda: mdist.history_topk(data["queries"], wrong, K))
    expect_error(ValueError, "k must be in [1, N = 2000]", lambda: mdist.history_topk(data["queries"], history, N + 1))
    queries = data["queries"] + (rank == 1)
    expect_error(ValueError, "the ranks were given different queries", lambda: mdist.history_topk(queries, history, K))
    expect_error(ValueError, "the history is empty", lambda: mdist.dual_form_apply(
        data["dual_queries"], data["inputs"][:0], data["errors"][:0]))
    expect_error(ValueError, "different queries, limit, dst", lambda: mdist.history_topk(
        data["queries"], history, K, dst=rank))
    expect_error(ValueError, "dst must be None or a rank in", lambda: mdist.history_topk(
        data["queries"], history, K, dst=world if rank == 0 else 0))
    expect_error(ValueError, "must tile the history", lambda: mdist.history_topk(
        data["queries"], history, K, row_offset=start + (rank == world - 1)))


def on_cuda(rank, world, where):
    """NCCL: states exchanged as CUDA tensors, the answer that of the single process on the GPU."""
    device = torch.device("cuda", rank)
    data = {name: t.to(device) for name, t in int_data().items()}
    limit = limits(world).to(device)
    assert_bitwise(distributed(data, limit, *my_part(rank, world)), single_process(data, limit))


def ddp_recording(rank, world, where):
    """Each rank records its own store under DDP (gradient clipping that bites, 2 micro-batches with
    no_sync on the first); the ranks' stores opened as one history give W_T - W_0 = sum of e_t x_t^T.
    A float16 recording (lr 1e-5: e_t subnormal unscaled) gets one error scale on all ranks, whose
    errors differ in size, and gives the change to float16's rounding."""
    for bucket_view, dtype, lr, tolerance in ((False, "float32", 0.1, 1e-5), (True, "float32", 0.1, 1e-5),
                                              (False, "float16", 1e-5, 3e-3)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
        start = model[0].weight.detach().double().clone(), model[0].bias.detach().double().clone()
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        folder = where["out"] / f"ddp-{int(bucket_view)}-{dtype}"
        recorder = HistoryRecorder(ddp, folder / f"rank{rank}", modules=["0"], dtype=dtype)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(100 + rank)
        for _ in range(3):
            for micro in range(2):
                x = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
                t = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
                with ddp.no_sync() if micro == 0 else contextlib.nullcontext():
                    with recorder.capture(targets=torch.zeros(2, 5, dtype=torch.long)):
                        (((ddp(x) - t) ** 2).sum() * (1 + rank) / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            recorder.step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
        recorder.close()
        dist.barrier()
        history = mdist.open_ranks([folder / f"rank{r}" for r in range(world)])
        spec = recorder.specs[0]
        inputs, errors = history[spec.input_field], history[spec.error_field]
        delta = true_units(history.attrs, spec.error_field,
                           metaclm_ext.dual_form_apply(torch.eye(4), inputs, errors).double().T)  # [out, in]
        change = model[0].weight.detach().double() - start[0]
        assert float((delta - change).norm() / change.norm()) < tolerance, (delta, change)
        bias = true_units(history.attrs, spec.error_field, errors.read().double().sum(0))
        assert float((bias - (model[0].bias.detach().double() - start[1])).norm() / bias.norm()) < tolerance
        scale = history.attrs["value_scales"][spec.error_field]  # open_ranks checked that the ranks agree
        assert scale == 1.0 if dtype == "float32" else scale >= 2.0**10


MAIN = [integers_uneven, integers_fp16_small_chunks, random_floats, random_floats_every_scan, offsets_out_of_rank_order,
        answer_on_rank_0_only, store_row_ranges, nan_rows_name_the_first_global_row, bad_input_on_one_rank,
        ddp_recording]


def lost_rank(rank, world, outcomes, how):
    """The last rank dies ("dead") or stops answering ("hung"); the others must raise, naming the group,
    within the group's timeout."""
    data = int_data()
    if rank == world - 1:
        if how == "hung":
            time.sleep(GROUP_TIMEOUT_S + 2)
        os._exit(3)
    began = time.monotonic()
    try:
        mdist.history_topk(data["queries"], data["history"][: N // world], K, row_offset=rank * (N // world))
    except mdist.DistributedHistoryError as exc:
        outcomes[how] = {"error": str(exc), "seconds": time.monotonic() - began}
        return
    outcomes[how] = {"error": None, "seconds": time.monotonic() - began}


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    scenario_set, store = sys.argv[5], (sys.argv[6] if len(sys.argv) > 6 else None)
    torch.set_num_threads(1)
    if scenario_set == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if scenario_set == "nccl" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    outcomes = {}
    if scenario_set in ("dead", "hung"):
        lost_rank(rank, world, outcomes, scenario_set)
    else:
        for scenario in [on_cuda] if scenario_set == "nccl" else MAIN:
            try:
                scenario(rank, world, {"store": store, "out": out})
                outcomes[scenario.__name__] = "ok"
            except Exception:  # recorded for the test to show; the next scenario still runs
                outcomes[scenario.__name__] = traceback.format_exc()
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(outcomes))
    sys.stdout.flush()
    os._exit(0)  # a group with a dead rank cannot be torn down cleanly


if __name__ == "__main__":
    main()
