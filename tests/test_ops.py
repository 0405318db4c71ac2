"""history_topk, history_label_mass and dual_form_apply against their plain PyTorch references, on every
device there is (the CPU always; CUDA where torch sees a GPU, skipped otherwise)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metaclm_ext
from metaclm_ext import reference as ref
from helpers import DEVICES, DTYPES, RTOL, assert_selection_close, assert_selection_equal, assert_sums_close
from helpers import dual_form_scale, label_mass_scale, on_cpu, on_device, random_limits, small_ints
from helpers import assert_topk_chunking_matches_reference

# (Q, H, Dh, N, k): heads of the paper's attention (8 x 8), its FFN (1 x 128), odd sizes, tails.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 8, 8, 1000, 10),
    (5, 1, 128, 777, 7),
    (2, 4, 16, 300, 300),
    (7, 2, 3, 513, 4),
    (4, 1, 64, 2049, 33),
    (2, 2, 32, 1500, 1024),
    (6, 3, 5, 257, 1),
    # enough queries for the CPU kernel's register tiles: for dh = 8, pairs of 16-query vectors and a
    # partial vector left over (37 queries; 40 with k past the sorted-list size); for others 8 queries
    # x 2 row vectors (short heads), 6 x 4 (heads of 32) and 8 x 3 (64 or more), each with leftover
    # queries; dh = 40 and 80 take the runtime-dh path
    (13, 2, 8, 1500, 10),
    (37, 3, 8, 1100, 10),
    (40, 1, 8, 700, 40),
    (11, 2, 16, 1300, 10),
    (14, 1, 128, 900, 10),
    (17, 2, 64, 1000, 10),
    (13, 1, 32, 600, 10),
    (9, 1, 40, 700, 5),
    (10, 1, 80, 500, 5),
    # heads of 64k dimensions take the int8 screen where the CPU has AVX-512 VNNI; 192: its runtime-dh path
    (19, 1, 192, 400, 5),
    # for the CUDA kernel: head dims 8..128 (and FFN-sized 768), k up to 2048 (its shared-memory selection
    # lists), more than 16 queries (several query groups per head) and histories long enough to be split
    # over many row blocks
    (4, 8, 8, 3000, 64),
    (3, 4, 16, 2500, 128),
    (5, 2, 64, 4000, 1000),
    (2, 1, 128, 6000, 1024),
    (3, 1, 96, 1200, 17),
    (2, 1, 768, 700, 50),
    (33, 2, 16, 900, 8),
    (1, 1, 64, 4100, 2048),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_exact_scores_match_reference(shape, dtype, device, gen):
    """Integer-valued data: scores are exact, so indices (ties included) and values match the reference
    and the CPU op (unchunked) bitwise, on every device and chunking."""
    q_, h, dh, n, k = shape
    queries = small_ints((q_, h, dh), gen, dtype=dtype)
    history = small_ints((n, h * dh), gen, dtype=dtype)
    limit = random_limits(gen, q_, n)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    cpu = metaclm_ext.history_topk(queries, history, k, limit=limit)
    for chunk_rows in (None, 97):
        got = metaclm_ext.history_topk(*on_device(device, queries, history), k, limit=limit.to(device),
                                       chunk_rows=chunk_rows)
        assert got.top.indices.device.type == device
        for g, w, c in ((got.top, want.top, cpu.top), (got.last, want.last, cpu.last)):
            assert_selection_equal(on_cpu(g), w)
            assert_selection_equal(on_cpu(g), c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_random_floats_match_reference(shape, dtype, device, gen):
    q_, h, dh, n, k = shape
    queries = torch.randn(q_, h, dh, generator=gen)
    history = torch.randn(n, h * dh, generator=gen).to(dtype)
    limit = random_limits(gen, q_, n)
    # A CPU limit beside tensors of another device is accepted (it is read on the host).
    got = metaclm_ext.history_topk(*on_device(device, queries, history), k, limit=limit)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    scores = ref.history_scores(queries, history, dtype=torch.float64)
    valid = torch.arange(n) < limit[:, None]
    assert_selection_close(on_cpu(got.top), want.top, scores, valid, True, RTOL[torch.float32])
    assert_selection_close(on_cpu(got.last), want.last, scores, valid, False, RTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_topk_query_dtype_mixes(device, gen):
    """fp16/bf16 queries are read as fp32; a fp32 query against a fp16 history is the common case."""
    history = small_ints((400, 16), gen, dtype=torch.float16)
    for qdtype in DTYPES:
        queries = small_ints((3, 2, 8), gen, dtype=qdtype)
        got = metaclm_ext.history_topk(*on_device(device, queries, history), 5)
        want = ref.history_topk_reference(queries.float(), history, 5)
        assert_selection_equal(on_cpu(got.top), want.top)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", [1, -30])
def test_topk_scores_of_one_sign_match_reference(low, device, gen):
    """Scores all positive or all negative: the selections' floors are then far from symmetric around
    zero, where the CPU kernel's scan of short heads must test its tiles by their extremes rather than
    by their magnitude (both tests are exercised: random-sign scores take the other)."""
    queries = small_ints((40, 2, 8), gen, low=1, high=4)
    history = small_ints((2500, 16), gen, low=low, high=low + 4, dtype=torch.float16)
    limit = random_limits(gen, 40, 2500)
    got = metaclm_ext.history_topk(*on_device(device, queries, history), 10, limit=limit)
    want = ref.history_topk_reference(queries, history, 10, limit=limit)
    assert_selection_equal(on_cpu(got.top), want.top)
    assert_selection_equal(on_cpu(got.last), want.last)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_ties_go_to_lower_rows(device):
    history = torch.ones(50, 4, device=device)
    got = metaclm_ext.history_topk(torch.ones(1, 4, device=device), history, 5, chunk_rows=7)
    assert got.top.indices.tolist() == [[[0, 1, 2, 3, 4]]]
    assert got.last.indices.tolist() == [[[0, 1, 2, 3, 4]]]
    assert got.top.values.tolist() == [[[4.0] * 5]]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_padding_when_fewer_candidates_than_k(device, gen):
    history, queries, limit = torch.randn(20, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.tensor([0, 2, 20])
    got = metaclm_ext.history_topk(*on_device(device, queries, history), 6, limit=limit)
    cpu = metaclm_ext.history_topk(queries, history, 6, limit=limit)
    assert torch.equal(got.top.indices.cpu(), cpu.top.indices) and torch.equal(got.last.indices.cpu(), cpu.last.indices)
    got = type(got)(on_cpu(got.top), on_cpu(got.last))
    assert (got.top.indices[0] == -1).all() and torch.isneginf(got.top.values[0]).all()
    assert (got.last.indices[0] == -1).all() and torch.isposinf(got.last.values[0]).all()
    assert set(got.top.indices[1, 0, :2].tolist()) == {0, 1} and (got.top.indices[1, 0, 2:] == -1).all()
    assert torch.isposinf(got.last.values[1, 0, 2:]).all()
    assert (got.top.indices[2] >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_int_limit_and_2d_queries(device, gen):
    history = small_ints((300, 24), gen)
    queries = small_ints((4, 24), gen)
    got = metaclm_ext.history_topk(*on_device(device, queries, history), 3, limit=100)
    want = ref.history_topk_reference(queries, history, 3, limit=100)
    assert got.top.indices.shape == (4, 1, 3)
    assert_selection_equal(on_cpu(got.top), want.top)
    got3 = metaclm_ext.history_topk(*on_device(device, queries, history), 3, heads=3)
    want3 = ref.history_topk_reference(queries.reshape(4, 3, 8), history, 3)
    assert_selection_equal(on_cpu(got3.last), want3.last)


@pytest.mark.parametrize("device", DEVICES)
@given(
    q=st.integers(1, 40), h=st.integers(1, 4), dh=st.integers(1, 20), n=st.integers(1, 700),
    k_frac=st.floats(0.0, 1.0), chunk=st.integers(1, 800), seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_topk_property_chunking_and_reference(device, q, h, dh, n, k_frac, chunk, seed, dtype):
    """Any shape, k (up to 40), limit and chunking gives exactly the reference's answer (integer data)."""
    assert_topk_chunking_matches_reference(device, q, h, dh, n, max(1, min(n, int(round(k_frac * min(n, 40))))),
                                           chunk, seed, dtype)


@pytest.mark.parametrize("device", DEVICES)
@given(
    q=st.integers(1, 20), h=st.integers(1, 2), dh=st.sampled_from([64, 128]), n=st.integers(1, 400),
    k=st.integers(1, 12), spread=st.integers(0, 8), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
)
def test_topk_property_rows_of_any_scale(device, q, h, dh, n, k, spread, seed, dtype):
    """Rows scaled by powers of two up to 2^+-spread (scores stay exact): where a block holds rows of
    very different magnitudes its int8 screen is coarse for the small ones (many round to zero), and the
    kernel must still give the reference's answer bitwise."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, n)
    queries = small_ints((q, h, dh), gen, dtype=dtype)
    scale = 2.0 ** torch.randint(-spread, spread + 1, (n, 1), generator=gen)
    history = (small_ints((n, h * dh), gen) * scale).to(dtype)
    limit = torch.randint(0, n + 1, (q,), generator=gen)
    got = metaclm_ext.history_topk(*on_device(device, queries, history), k, limit=limit, chunk_rows=97)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    assert_selection_equal(on_cpu(got.top), want.top)
    assert_selection_equal(on_cpu(got.last), want.last)


def test_topk_int8_screen_hard_rows(gen):
    """What strains a screen by scaled int8 scores: rows spanning six decades, an outlier dimension, a
    run of zero rows longer than a block, duplicated rows (exact ties) and a zero query. The answer is
    the reference's, and bitwise the same for any chunking and thread count."""
    n, d = 3000, 256
    history = torch.randn(n, d, generator=gen) * 10.0 ** torch.empty(n, 1).uniform_(-3, 3, generator=gen)
    history[:, 7] *= 1000
    history[1000:1250] = 0
    history[2000:2010] = history[1990]
    queries = torch.randn(19, 2, 128, generator=gen)
    queries[3] = 0
    limit = random_limits(gen, 19, n)
    want = ref.history_topk_reference(queries, history, 10, limit=limit)
    scores = ref.history_scores(queries, history, dtype=torch.float64)
    valid = torch.arange(n) < limit[:, None]
    first = metaclm_ext.history_topk(queries, history, 10, limit=limit)
    assert_selection_close(first.top, want.top, scores, valid, True, RTOL[torch.float32])
    assert_selection_close(first.last, want.last, scores, valid, False, RTOL[torch.float32])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for chunk_rows in (97, 1000):
            again = metaclm_ext.history_topk(queries, history, 10, limit=limit, chunk_rows=chunk_rows)
            for a, b in ((again.top, first.top), (again.last, first.last)):
                assert_selection_equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("q, h, dh", [(127, 2, 8), (128, 2, 8), (333, 3, 8), (200, 1, 128), (150, 2, 20)])
def test_topk_threads_split_rows_or_queries(q, h, dh, gen):
    """Two threads split the rows below 128 queries and the queries from 128 on (parts of equal work
    under per-query limits, boundaries on 16-query vectors): the answer is the reference's bitwise, and
    the same as one thread's, for every scan (query vectors for dh = 8, int8 screen for 128, fp32 rows)."""
    n, k = 5000, 10
    queries = small_ints((q, h, dh), gen)
    history = small_ints((n, h * dh), gen).half()
    limit = torch.randint(0, n + 1, (q,), generator=gen).sort().values  # as the analysis orders them
    limit[:3] = 0
    limit[-1] = n
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    threads = torch.get_num_threads()
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            got = metaclm_ext.history_topk(queries, history, k, limit=limit)
            assert_selection_equal(got.top, want.top)
            assert_selection_equal(got.last, want.last)
    finally:
        torch.set_num_threads(threads)


def assert_top_row_over_chunks(query, history, row):
    """The single best row for one query is `row`, with its score, when the floor comes from an earlier
    chunk (chunks of 50 and 100 rows)."""
    for chunk_rows in (50, 100):
        got = metaclm_ext.history_topk(query[None, None], history, 1, chunk_rows=chunk_rows)
        assert got.top.indices.item() == row
        assert got.top.values.item() == pytest.approx(float(history[row] @ query), rel=1e-6)


def test_topk_int8_screen_worst_case_rounding(gen):
    """A row whose int8 approximation errs by nearly the screen's bound: every dimension of the query and
    of row 150 sits just below a rounding half-step, all on the side that lowers the approximation, so
    only a screen whose bound holds lets it past row 0 (which scores a little less, set the floor in an
    earlier chunk, and approximates higher)."""
    sign = torch.where(torch.rand(64, generator=gen) < 0.5, -1.0, 1.0)
    sign[0] = 1
    query = sign * 50.49
    query[0] = 127  # the query's scale: 1
    history = torch.zeros(200, 64)
    history[0] = sign * 20.4
    history[150] = sign * 20.49
    history[:, 0] = 0
    history[151, 0] = -127  # the block's scale: 1
    assert_top_row_over_chunks(query, history, 150)


def test_topk_int8_screen_worst_case_query_rounding(gen):
    """The same for heads of 8 dimensions (the query-vector screen), where the query's rounding errs:
    row 150 holds +-1 with the signs of the query's rounding errors (+-0.49 each), so its approximation
    falls short by nearly the bound's query term, and row 0 (0.999 times it) sets the floor before.
    Row 1 sets the last floor far below zero, so the zero rows beside row 150 send no tile to the
    exact path."""
    sign = torch.where(torch.rand(8, generator=gen) < 0.5, -1.0, 1.0)
    query = sign * 50.49
    query[0] = 127  # the query's scale: 1
    history = torch.zeros(200, 8)
    history[150] = sign
    history[150, 0] = 0
    history[0] = 0.999 * history[150]
    history[1] = -2 * history[150]
    assert_top_row_over_chunks(query, history, 150)


@pytest.mark.parametrize("device", DEVICES)
@given(n=st.integers(1, 600), k=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_topk_property_top_is_last_of_negated_queries(device, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, n)
    queries, history = on_device(device, small_ints((2, 2, 4), gen), small_ints((n, 8), gen))
    a = metaclm_ext.history_topk(queries, history, k)
    b = metaclm_ext.history_topk(-queries, history, k)
    assert torch.equal(a.top.indices, b.last.indices)
    assert torch.equal(a.top.values, -b.last.values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_label_mass_matches_reference(shape, dtype, device, gen):
    q_, h, dh, n, _ = shape
    num_labels = int(torch.randint(1, 300, (1,), generator=gen))  # the benchmarks use 280
    queries = torch.randn(q_, h, dh, generator=gen)
    history = torch.randn(n, h * dh, generator=gen).to(dtype)
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    limit = random_limits(gen, q_, n)
    want = ref.history_label_mass_reference(queries, history, labels, num_labels, limit=limit)
    for chunk_rows in (None, 61):
        got = metaclm_ext.history_label_mass(*on_device(device, queries, history, labels), num_labels, limit=limit,
                                             chunk_rows=chunk_rows)
        assert got.device.type == device and got.dtype == torch.float32 and got.shape == (q_, h, num_labels)
        assert_sums_close(got, want, label_mass_scale(queries, history))


@pytest.mark.parametrize("device", DEVICES)
@given(n=st.integers(1, 3000), labels=st.integers(1, 9), chunk=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1))
def test_label_mass_property_sums_to_total_score(device, n, labels, chunk, seed):
    """Label masses of integer data are exact and add up to the total score over the history."""
    gen = torch.Generator().manual_seed(seed)
    queries = small_ints((3, 2, 4), gen)
    history = small_ints((n, 8), gen)
    lab = torch.randint(0, labels, (n,), generator=gen)
    limit = torch.randint(0, n + 1, (3,), generator=gen)
    got = metaclm_ext.history_label_mass(*on_device(device, queries, history, lab), labels, limit=limit,
                                         chunk_rows=chunk).cpu()
    want = ref.history_label_mass_reference(queries, history, lab, labels, limit=limit)
    assert torch.equal(got.double(), want)
    total = ref.history_scores(queries, history, dtype=torch.float64) * (torch.arange(n) < limit[:, None])[:, None]
    assert torch.equal(got.double().sum(-1), total.sum(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_labels", [300, 3000])
def test_label_mass_over_many_units(dtype, num_labels, device, gen):
    """Histories longer than the CPU kernel's 8192-row fp32 units, with limits and chunks inside units;
    past 2048 labels the CPU kernel adds rows straight into fp64."""
    n = 30_000
    queries = torch.randn(5, 2, 8, generator=gen)
    history = torch.randn(n, 16, generator=gen).to(dtype)
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    limit = torch.tensor([n, 8191, 8193, 20_000, 1])
    want = ref.history_label_mass_reference(queries, history, labels, num_labels, limit=limit)
    scale = label_mass_scale(queries, history)
    for chunk_rows in (None, 7001):
        got = metaclm_ext.history_label_mass(*on_device(device, queries, history, labels), num_labels, limit=limit,
                                             chunk_rows=chunk_rows)
        assert_sums_close(got, want, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_label_mass_units_meet_in_fp64(dtype, device):
    """140,000 rows of 1 + 2^-10 (1 + 2^-7 in bf16): each 8192-row unit's fp32 sum is exact, and their
    total is not in fp32 (past 2^14, or 2^17, rows the spacing of fp32 is coarser than the step), so
    only fp64 across units gives the exact mass."""
    n = 140_000
    step = 2**-7 if dtype == torch.bfloat16 else 2**-10
    history = torch.full((n, 4), 1 + step, device=device).to(dtype)
    queries = torch.ones(1, 1, 4, device=device)
    got = metaclm_ext.history_label_mass(queries, history, torch.zeros(n, dtype=torch.int64, device=device), 1)
    assert got.item() == 4 * n * (1 + step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_mass_rows_too_large_for_fp32_sums(dtype, device):
    """Finite rows whose sum overflows fp32 (labels 0 and 2) are summed again in fp64; the rows of
    other labels keep their fp32 unit sums."""
    big = 3e38
    history = torch.tensor([[big, -1.0], [big, 2.0], [1.5, 0.25], [-big, big], [-big, big], [0.5, 0.5]]).to(dtype)
    labels = torch.tensor([0, 0, 1, 2, 2, 1])
    queries = torch.tensor([[[1e-3, 1e-3]]])
    got = metaclm_ext.history_label_mass(*on_device(device, queries, history, labels), 3).cpu()
    want = ref.history_label_mass_reference(queries, history, labels, 3)
    assert bool(torch.isfinite(got).all())
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# (Q, D_in, D_out, N); on AVX-512 CPUs 300 x 250 is past the size the CPU kernel's tiles take (its
# GEMM path), the others are tiled, 130 x 70 with two column tiles and padding
@pytest.mark.parametrize("dims", [(1, 1, 1, 1), (5, 64, 64, 1000), (3, 128, 64, 2500), (8, 7, 13, 300), (200, 16, 4, 90),
                                  (4, 130, 70, 700), (3, 300, 250, 600)])
def test_dual_form_matches_reference(dims, dtype, device, gen):
    q_, d_in, d_out, n = dims
    queries = torch.randn(q_, d_in, generator=gen)
    inputs = torch.randn(n, d_in, generator=gen).to(dtype)
    errors = torch.randn(n, d_out, generator=gen).to(dtype)
    limit = random_limits(gen, q_, n)
    want = ref.dual_form_apply_reference(queries, inputs, errors, limit=limit)
    for chunk_rows in (None, 37):
        got = metaclm_ext.dual_form_apply(*on_device(device, queries, inputs, errors), limit=limit.to(device),
                                          chunk_rows=chunk_rows)
        assert got.device.type == device and got.dtype == torch.float32 and got.shape == (q_, d_out)
        assert_sums_close(got, want, dual_form_scale(queries, inputs, errors))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_form_long_history_matches_reference(dtype, device, gen):
    """Histories of several 8192-row units (the CPU kernel's threads split them) with limits inside
    units, at unit edges and at the ends."""
    n, d_in, d_out = 3 * 8192 + 517, 24, 5
    queries = torch.randn(6, d_in, generator=gen)
    inputs = torch.randn(n, d_in, generator=gen).to(dtype)
    errors = torch.randn(n, d_out, generator=gen).to(dtype)
    limit = torch.tensor([0, 1, 8192, 10000, 2 * 8192 + 1, n])
    got = metaclm_ext.dual_form_apply(*on_device(device, queries, inputs, errors), limit=limit)
    want = ref.dual_form_apply_reference(queries, inputs, errors, limit=limit)
    assert_sums_close(got, want, dual_form_scale(queries, inputs, errors))


def test_dual_form_equals_linear_layer_trained_by_sgd(gen):
    """The point of the op: W x after plain SGD equals W0 x + dual_form_apply(x, inputs, errors)."""
    layer = torch.nn.Linear(12, 5, bias=False).double()
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    xs, es = [], []
    for _ in range(30):
        x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
        y = layer(x)
        y.retain_grad()
        loss = (y - torch.randn(4, 5, generator=gen, dtype=torch.float64)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        xs.append(x)
        es.append(-0.1 * y.grad)
        opt.step()
    queries = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    dual = metaclm_ext.dual_form_apply(queries.float(), torch.cat(xs).float(), torch.cat(es).float())
    want = queries @ w0.T + 0.0
    actual = layer(queries).detach()
    assert torch.allclose((want + dual.double()), actual, rtol=1e-4, atol=1e-5)


def test_tensor_rows_source_equals_tensor(gen):
    """TensorRows (the row source that streams a CPU tensor to CUDA queries) reads like the tensor itself."""
    from metaclm_ext.ops import TensorRows

    history, queries = small_ints((900, 16), gen), small_ints((3, 2, 8), gen)
    got = metaclm_ext.history_topk(queries, TensorRows(history), 7, chunk_rows=100)
    want = metaclm_ext.history_topk(queries, history, 7)
    assert_selection_equal(got.top, want.top)
    assert_selection_equal(got.last, want.last)


def test_outputs_do_not_pretend_to_be_differentiable(gen):
    """The merge operators have no backward: an output that required grad would backprop a wrong gradient."""
    q = torch.randn(3, 8, generator=gen, requires_grad=True)
    history = torch.randn(20, 8, generator=gen, requires_grad=True)
    errors = torch.randn(20, 5, generator=gen, requires_grad=True)
    outputs = [*metaclm_ext.history_topk(q, history, 3).top,
               metaclm_ext.history_label_mass(q, history, torch.arange(20) % 4, 4),
               metaclm_ext.dual_form_apply(q, history, errors)]
    for out in outputs:
        assert not out.requires_grad and out.grad_fn is None
        with pytest.raises(RuntimeError, match="does not require grad"):
            out.float().sum().backward()
    assert q.grad is None and history.grad is None and errors.grad is None
    assert torch.is_grad_enabled()  # the ops leave autograd as they found it
