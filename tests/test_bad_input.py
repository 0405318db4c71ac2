"""Every bad input gets a clear Python exception that names the argument: never a crash or a wrong answer."""
import pytest
import torch

import metaclm_ext
from metaclm_ext.ops import PAD_INDEX

Q = torch.randn(3, 2, 4)
H = torch.randn(50, 8)


def topk(queries=Q, history=H, k=5, **kw):
    return metaclm_ext.history_topk(queries, history, k, **kw)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(queries=torch.randn(3)), ValueError, r"queries must be \[Q, D\] or \[Q, H, Dh\], got 1-D"),
        (dict(queries=torch.randn(1, 2, 3, 4)), ValueError, r"queries must be .* got 4-D"),
        (dict(history=torch.randn(50)), ValueError, r"history must be 2-D"),
        (dict(history=torch.randn(5, 2, 4)), ValueError, r"history must be 2-D"),
        (dict(queries=torch.randn(3, 3, 3), history=torch.randn(50, 8)), ValueError, r"history width D=8 is not divisible by the number of heads H=3"),
        (dict(queries=torch.randn(3, 2, 3), history=torch.randn(50, 8)), ValueError, r"H\*Dh = 2\*3 = 6 but the history width is D=8"),
        (dict(queries=torch.randn(3, 9)), ValueError, r"H\*Dh = 1\*9 = 9 but the history width is D=8"),
        (dict(queries=torch.randn(3, 8), heads=3), ValueError, r"query width D=8 is not divisible by heads H=3"),
        (dict(queries=torch.randint(0, 3, (3, 2, 4))), TypeError, r"queries must be a float tensor .* integer"),
        (dict(history=torch.randint(0, 3, (50, 8))), TypeError, r"history must be a float tensor .* integer"),
        (dict(history=torch.randn(50, 8, dtype=torch.complex64)), TypeError, r"history must be a float tensor .* complex"),
        (dict(queries=torch.randn(3, 2, 4, dtype=torch.complex64)), TypeError, r"queries must be a float tensor .* complex"),
        (dict(history=torch.randn(50, 8, dtype=torch.float64)), TypeError, r"history has unsupported dtype torch.float64"),
        (dict(queries=torch.randn(3, 2, 4, dtype=torch.float64)), TypeError, r"queries has unsupported dtype"),
        (dict(history=torch.randn(0, 8)), ValueError, r"history is empty"),
        (dict(queries=torch.randn(0, 2, 4)), ValueError, r"queries is empty"),
        (dict(k=0), ValueError, r"k must be in \[1, N = 50\], got 0"),
        (dict(k=-3), ValueError, r"k must be in \[1, N = 50\], got -3"),
        (dict(k=51), ValueError, r"k must be in \[1, N = 50\], got 51"),
        (dict(k=2.0), TypeError, r"k must be an int"),
        (dict(limit=-1), ValueError, r"limit\[0\] = -1 is outside \[0, N = 50\]"),
        (dict(limit=51), ValueError, r"limit\[0\] = 51 is outside"),
        (dict(limit=torch.tensor([1, 2, 60])), ValueError, r"limit\[2\] = 60 is outside"),
        (dict(limit=torch.tensor([1, 2])), ValueError, r"limit must have shape \[Q\] = \[3\], got \[2\]"),
        (dict(limit=torch.tensor([[1, 2, 3]])), ValueError, r"limit must have shape \[Q\]"),
        (dict(limit=torch.tensor([1.0, 2.0, 3.0])), TypeError, r"limit must hold integers"),
        (dict(limit=2.5), TypeError, r"limit must be an int or an int64 tensor"),
        (dict(history=[[1.0] * 8] * 50), TypeError, r"history must be a tensor or a HistoryStore field"),
        (dict(queries="q"), TypeError, r"queries must be a tensor"),
        (dict(chunk_rows=0), ValueError, r"chunk_rows must be positive"),
        (dict(queries=torch.randn(3, 2, 4, device="meta")), ValueError, r"queries are on meta but history is on cpu"),
    ],
)
def test_topk_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        topk(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_history_names_row(bad, dtype):
    history = torch.randn(5000, 8).to(dtype)
    history[3210, 5] = bad
    for queries in (Q, torch.randn(3, 1, 8)):  # heads of 4 and of 8 dimensions: the CPU kernel's two scans
        with pytest.raises(ValueError, match=r"history row 3210 contains NaN or Inf"):
            topk(queries=queries, history=history, chunk_rows=1000)
    with pytest.raises(ValueError, match=r"history row 3210 contains NaN or Inf"):
        metaclm_ext.history_label_mass(Q, history, torch.zeros(5000, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=r"inputs row 3210 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8), history, torch.randn(5000, 3))
    with pytest.raises(ValueError, match=r"errors row 3210 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8), torch.randn(5000, 8), history)


@pytest.mark.parametrize("queries", [8, 200])
def test_topk_names_the_first_bad_row_under_either_thread_split(queries):
    """Two threads split the rows for 8 queries and the queries for 200: either way the first bad row is
    the one named, not the first one a thread happened to meet."""
    history = torch.randn(12000, 8).half()
    history[9000, 1] = float("nan")
    history[2500, 6] = float("inf")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match=r"history row 2500 contains NaN or Inf"):
            metaclm_ext.history_topk(torch.randn(queries, 1, 8), history, 5, limit=torch.full((queries,), 12000))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_check_reads_views_as_views(dtype):
    """A column view of a wider tensor is checked by its own elements: a NaN outside the view is no error
    (the check once walked the parent's memory as if the view were contiguous), a NaN inside it is."""
    wide = torch.randn(1000, 16).to(dtype)
    wide[5, 12] = float("nan")  # outside the view
    view = wide[:, :8]
    labels = torch.zeros(1000, dtype=torch.int64)
    metaclm_ext.history_label_mass(Q, view, labels, 1)
    metaclm_ext.dual_form_apply(torch.randn(2, 8), view, view)
    topk(history=view)
    wide[7, 3] = float("inf")  # inside it
    with pytest.raises(ValueError, match=r"history row 7 contains NaN or Inf"):
        metaclm_ext.history_label_mass(Q, view, labels, 1)
    with pytest.raises(ValueError, match=r"inputs row 7 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8), view, view)
    with pytest.raises(ValueError, match=r"history row 7 contains NaN or Inf"):
        topk(history=view)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dual_form_names_the_first_bad_row_of_either(dtype):
    """Across row blocks and threads the first bad row wins, whichever of inputs and errors holds it;
    on the same row, inputs."""
    inputs, errors = torch.randn(40000, 8).to(dtype), torch.randn(40000, 3).to(dtype)
    inputs[15000, 2] = float("nan")
    inputs[31000, 0] = float("inf")
    errors[9000, 1] = float("inf")
    errors[35000, 1] = float("nan")
    with pytest.raises(ValueError, match=r"errors row 9000 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8), inputs, errors)
    errors[9000, 1] = 0.0
    errors[15000, 1] = float("nan")
    with pytest.raises(ValueError, match=r"inputs row 15000 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8), inputs, errors)
    errors[15000, 1] = 0.0
    errors[15010, 2] = float("nan")  # a later row of the same 64-row block: inputs row 15000 still wins
    with pytest.raises(ValueError, match=r"inputs row 15000 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8), inputs, errors)


def test_non_finite_query_names_row():
    queries = Q.clone()
    queries[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"queries row 2 contains NaN or Inf"):
        topk(queries=queries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "bad_values, bad_labels, match",
    [
        ({30000: float("inf"), 30500: float("-inf")}, {}, r"history row 30000 contains NaN or Inf"),  # Inf - Inf in one sum
        ({30000: float("nan")}, {31000: 9}, r"history row 30000 contains NaN or Inf"),  # value before label
        ({31000: float("nan")}, {30000: 9}, r"labels row 30000 is 9"),  # label before value, same thread
        ({39000: float("nan")}, {2000: -3}, r"labels row 2000 is -3"),  # in the other thread's rows
        ({2000: float("inf")}, {39000: 9}, r"history row 2000 contains NaN or Inf"),
    ],
)
def test_label_mass_names_the_first_bad_row(dtype, bad_values, bad_labels, match):
    """The first bad row wins, whether its value or its label is bad, across label blocks and threads
    (the kernel checks values by their sums and labels before use)."""
    history = torch.randn(40000, 8).to(dtype)
    labels = torch.arange(40000) % 3
    for row, value in bad_values.items():
        history[row, 3] = value
        labels[row] = 1
    for row, label in bad_labels.items():
        labels[row] = label
    with pytest.raises(ValueError, match=match):
        metaclm_ext.history_label_mass(Q, history, labels, 4)


def test_label_mass_bad_labels():
    labels = torch.zeros(50, dtype=torch.int64)
    labels[17] = 4
    with pytest.raises(ValueError, match=r"labels row 17 is 4, outside \[0, num_labels = 4\)"):
        metaclm_ext.history_label_mass(Q, H, labels, 4)
    labels[17] = -1
    with pytest.raises(ValueError, match=r"labels row 17 is -1"):
        metaclm_ext.history_label_mass(Q, H, labels, 4)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[50\], got \[49\]"):
        metaclm_ext.history_label_mass(Q, H, torch.zeros(49, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        metaclm_ext.history_label_mass(Q, H, torch.zeros(50), 4)
    with pytest.raises(ValueError, match=r"num_labels must be a positive int"):
        metaclm_ext.history_label_mass(Q, H, torch.zeros(50, dtype=torch.int64), 0)


def test_dual_form_bad_shapes():
    with pytest.raises(ValueError, match=r"errors has 40 rows but inputs has 50"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8), H, torch.randn(40, 3))
    with pytest.raises(ValueError, match=r"queries must be a 2-D tensor"):
        metaclm_ext.dual_form_apply(torch.randn(2, 2, 4), H, torch.randn(50, 3))
    with pytest.raises(ValueError, match=r"H\*Dh = 1\*7 = 7 but the history width is D=8"):
        metaclm_ext.dual_form_apply(torch.randn(2, 7), H, torch.randn(50, 3))


def test_raw_op_rejects_bad_state_without_crashing():
    """Direct callers of torch.ops.metaclm_ext.* get a ValueError too, not a segfault."""
    keys = torch.full((3, 2, 5), float("-inf"))
    idx = torch.zeros(3, 2, 5, dtype=torch.int64)
    lim = torch.full((3,), 50)
    with pytest.raises(ValueError, match="history width 7 != heads \\* head_dim"):
        torch.ops.metaclm_ext.history_topk_merge(Q, torch.randn(50, 7), 0, lim, keys, idx, keys, idx)
    with pytest.raises(ValueError, match="bad heap indices"):
        torch.ops.metaclm_ext.history_topk_merge(Q, H, 0, lim, keys, idx.int(), keys, idx)
    with pytest.raises(ValueError, match="limit must be int64"):
        torch.ops.metaclm_ext.history_topk_merge(Q, H, 0, lim.int(), keys, idx, keys, idx)


ZERO_WIDTH_CALLS = {
    "topk": lambda: metaclm_ext.history_topk(torch.randn(5, 0), torch.randn(3000, 0), k=1),
    "label_mass": lambda: metaclm_ext.history_label_mass(
        torch.randn(5, 0), torch.randn(30, 0), torch.zeros(30, dtype=torch.int64), 3),
    "dual_form_errors": lambda: metaclm_ext.dual_form_apply(torch.randn(5, 4), torch.randn(30, 4), torch.randn(30, 0)),
    "dual_form_inputs": lambda: metaclm_ext.dual_form_apply(torch.randn(5, 0), torch.randn(30, 0), torch.randn(30, 3)),
}
ZERO_WIDTH_ERRORS = {
    "topk": r"history width must be >= 1, got 0",
    "label_mass": r"history width must be >= 1, got 0",
    "dual_form_errors": r"errors width must be >= 1, got 0",
    "dual_form_inputs": r"inputs width must be >= 1, got 0",
}


@pytest.mark.parametrize("case", sorted(ZERO_WIDTH_CALLS))
def test_zero_width_rows_are_refused(case):
    """Rows of width 0 once reached kernels that divide by the width (a segfault or SIGFPE)."""
    with pytest.raises(ValueError, match=ZERO_WIDTH_ERRORS[case]):
        ZERO_WIDTH_CALLS[case]()


def _raw_topk_state(num_queries, heads, k):
    keys = torch.full((num_queries, heads, k), float("-inf"))
    indices = torch.full((num_queries, heads, k), PAD_INDEX, dtype=torch.int64)
    return keys, indices, keys.clone(), indices.clone()


def test_raw_merge_ops_refuse_zero_width():
    """The merge operators check widths themselves: direct callers bypass the Python front."""
    ops, lim, f64 = torch.ops.metaclm_ext, torch.full((5,), 30), torch.float64
    for queries in (torch.randn(5, 1, 0), torch.randn(5, 0, 4)):  # head_dim 0, no heads
        with pytest.raises(ValueError, match=r"queries heads and head_dim must be >= 1, got \[Q, H, Dh\] = \[5, "):
            ops.history_topk_merge(queries, torch.randn(30, 0), 0, lim, *_raw_topk_state(5, queries.shape[1], 1))
    with pytest.raises(ValueError, match=r"queries heads and head_dim must be >= 1"):
        ops.history_label_mass_merge(torch.randn(5, 1, 0), torch.randn(30, 0), torch.zeros(30, dtype=torch.int64), 0,
                                     lim, torch.zeros(3, 0, dtype=f64), torch.zeros(5, 1, 3, dtype=f64))
    with pytest.raises(ValueError, match=r"errors width must be >= 1, got 0"):
        ops.dual_form_apply_merge(torch.randn(5, 4), torch.randn(30, 4), torch.randn(30, 0), 0, lim,
                                  torch.zeros(0, 4, dtype=f64), torch.zeros(5, 0, dtype=f64))
    with pytest.raises(ValueError, match=r"inputs width must be >= 1, got 0"):
        ops.dual_form_apply_merge(torch.randn(5, 0), torch.randn(30, 0), torch.randn(30, 3), 0, lim,
                                  torch.zeros(3, 0, dtype=f64), torch.zeros(5, 3, dtype=f64))


def test_raw_topk_merge_refuses_an_empty_state():
    """A state of k = 0 entries once segfaulted: the threads seed their floors from its first entry."""
    with pytest.raises(ValueError, match=r"top_keys must be \[Q, H, k\] with k >= 1, got \[3, 2, 0\]"):
        torch.ops.metaclm_ext.history_topk_merge(Q, H, 0, torch.full((3,), 50), *_raw_topk_state(3, 2, 0))


RAW_MERGE_ARGS = {  # a valid call of each merge operator but for its row_offset (-5)
    "history_topk_merge": lambda: (Q, H, -5, torch.full((3,), 50), *_raw_topk_state(3, 2, 4)),
    "history_label_mass_merge": lambda: (Q, H, torch.zeros(50, dtype=torch.int64), -5, torch.full((3,), 50),
                                         torch.zeros(4, 8, dtype=torch.float64), torch.zeros(3, 2, 4, dtype=torch.float64)),
    "dual_form_apply_merge": lambda: (torch.randn(3, 8), H, torch.randn(50, 6), -5, torch.full((3,), 50),
                                      torch.zeros(6, 8, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.float64)),
}


@pytest.mark.parametrize("op", sorted(RAW_MERGE_ARGS))
def test_raw_merge_ops_refuse_a_negative_row_offset(op):
    """A negative row_offset once gave negative row indices (and label rows outside the chunk)."""
    with pytest.raises(ValueError, match=r"row_offset must be >= 0, got -5"):
        getattr(torch.ops.metaclm_ext, op)(*RAW_MERGE_ARGS[op]())


def test_tensor_rows_needs_a_cpu_tensor():
    from metaclm_ext.ops import TensorRows

    with pytest.raises(TypeError, match=r"TensorRows wraps a CPU tensor, got list"):
        TensorRows([[1.0]])
    with pytest.raises(TypeError, match=r"TensorRows wraps a CPU tensor, got Tensor on meta"):
        TensorRows(torch.empty(3, 2, device="meta"))
