"""Typed Python front of the history operators.

Each public op validates its arguments (clear errors naming the argument), then streams the history
chunk by chunk (:mod:`metaclm_ext.stream`) through a C++/CUDA *merge* operator (see
csrc/metaclm_ext.cpp) that folds the chunk into a small running state, and finally turns the state into
the answer. A history is either a tensor or any *row source* with ``shape``, ``dtype``, ``device`` and
``iter_chunks(chunk_rows, stop)`` (for example a field of a :class:`metaclm_ext.store.HistoryStore`), so
memory is bounded by the chunk size. The fake (meta) implementations at the end let the merge operators
trace under torch.compile.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from . import stream
from .dtypes import HISTORY_DTYPES
from .stream import History, RowSource, TensorRows

__all__ = ["HistoryTopK", "Selection", "TensorRows", "dual_form_apply", "history_label_mass", "history_topk"]

PAD_INDEX = torch.iinfo(torch.int64).max  # heap padding inside the merge state

_ops = torch.ops.metaclm_ext

# The merge operators register no backward, so autograd would silently skip them and hand back wrong
# gradients: the public ops run without autograd and their outputs do not pretend to be differentiable.
NOT_DIFFERENTIABLE = torch.no_grad()


class Selection(NamedTuple):
    values: torch.Tensor  # fp32 [Q, H, k]
    indices: torch.Tensor  # int64 [Q, H, k] row numbers into the history, -1 where fewer than k rows


class HistoryTopK(NamedTuple):
    top: Selection  # most attended rows, scores descending
    last: Selection  # least attended rows, scores ascending


# --------------------------------------------------------------------------------------------------
# Validation


def _check_float(name: str, dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        kind = "complex" if dtype.is_complex else "integer/bool"
        raise TypeError(f"{name} must be a float tensor (float32, float16 or bfloat16), got {kind} {dtype}")
    if dtype not in HISTORY_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {dtype}; use float32, float16 or bfloat16")


def _check_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name} row {int(bad.nonzero()[0, 0])} contains NaN or Inf")


def shape_of(name: str, source: History, allow_empty: bool = False) -> tuple[int, int]:
    if not isinstance(source, torch.Tensor) and not hasattr(source, "iter_chunks"):
        raise TypeError(f"{name} must be a tensor or a HistoryStore field, got {type(source).__name__}")
    shape = tuple(source.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {list(shape)}")
    _check_float(name, source.dtype)
    if shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 rows)")
    if shape[1] == 0:
        raise ValueError(f"{name} width must be >= 1, got 0")
    return shape


def as_heads(queries: torch.Tensor, width: int, heads: Optional[int], sources: dict) -> torch.Tensor:
    """Queries as fp32 [Q, H, Dh] with H * Dh == width, on the device of every source in `sources`."""
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries must be a tensor, got {type(queries).__name__}")
    _check_float("queries", queries.dtype)
    for name, source in sources.items():
        # A CPU row source beside CUDA queries is streamed through pinned buffers (stream.staged_chunks).
        staged = queries.is_cuda and not isinstance(source, torch.Tensor) and torch.device(source.device).type == "cpu"
        if torch.device(source.device) != queries.device and not staged:
            raise ValueError(f"queries are on {queries.device} but {name} is on {source.device}: move them to one device"
                             " (or wrap a CPU history in metaclm_ext.ops.TensorRows to stream it to the GPU)")
    if queries.dim() == 2:
        h = 1 if heads is None else int(heads)
        if h <= 0:
            raise ValueError(f"heads must be positive, got {heads}")
        if queries.shape[1] % h:
            raise ValueError(f"query width D={queries.shape[1]} is not divisible by heads H={h}")
        queries = queries.reshape(queries.shape[0], h, queries.shape[1] // h)
    elif queries.dim() == 3:
        if heads is not None and heads != queries.shape[1]:
            raise ValueError(f"heads={heads} disagrees with queries of shape {list(queries.shape)}")
    else:
        raise ValueError(f"queries must be [Q, D] or [Q, H, Dh], got {queries.dim()}-D shape {list(queries.shape)}")
    if queries.shape[0] == 0:
        raise ValueError("queries is empty (0 rows)")
    h, dh = queries.shape[1], queries.shape[2]
    if h * dh != width:
        if width % h:
            raise ValueError(f"history width D={width} is not divisible by the number of heads H={h}")
        raise ValueError(f"queries have H*Dh = {h}*{dh} = {h * dh} but the history width is D={width}")
    _check_finite("queries", queries)
    return queries.to(torch.float32).contiguous()


def limit_tensor(limit, num_queries: int, num_rows: int, device: torch.device) -> torch.Tensor:
    if limit is None:
        return torch.full((num_queries,), num_rows, dtype=torch.int64, device=device)
    if isinstance(limit, bool) or not isinstance(limit, (int, torch.Tensor)):
        raise TypeError(f"limit must be an int or an int64 tensor [Q], got {type(limit).__name__}")
    if isinstance(limit, int):
        limit = torch.full((num_queries,), limit, dtype=torch.int64, device=device)
    if limit.dtype.is_floating_point or limit.dtype.is_complex or limit.dtype == torch.bool:
        raise TypeError(f"limit must hold integers, got {limit.dtype}")
    if tuple(limit.shape) != (num_queries,):
        raise ValueError(f"limit must have shape [Q] = [{num_queries}], got {list(limit.shape)}")
    limit = limit.to(device=device, dtype=torch.int64).contiguous()
    bad = (limit < 0) | (limit > num_rows)
    if bool(bad.any()):
        q = int(bad.nonzero()[0, 0])
        raise ValueError(f"limit[{q}] = {int(limit[q])} is outside [0, N = {num_rows}]")
    return limit


# --------------------------------------------------------------------------------------------------
# history_topk


def check_k(k: int, num_rows: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0 or k > num_rows:
        raise ValueError(f"k must be in [1, N = {num_rows}], got {k}")


def sort_heap_entries(keys: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heap entries along the last dim, best first: keys descending, ties to the lower row (padding last)."""
    order = torch.argsort(indices, dim=-1, stable=True)
    keys, indices = keys.gather(-1, order), indices.gather(-1, order)
    order = torch.argsort(keys, dim=-1, descending=True, stable=True)
    return keys.gather(-1, order), indices.gather(-1, order)


def _finalize_selection(keys: torch.Tensor, indices: torch.Tensor, negate: bool) -> Selection:
    """Heap state -> entries sorted by (score, row) in the op's order, padding last."""
    keys, indices = sort_heap_entries(keys, indices)
    indices = indices.masked_fill(indices == PAD_INDEX, -1)
    return Selection(-keys if negate else keys, indices)


def finalize_topk(state: tuple) -> HistoryTopK:
    """The answer of history_topk from its merge state (top keys, top rows, last keys, last rows)."""
    top_keys, top_idx, last_keys, last_idx = state
    return HistoryTopK(_finalize_selection(top_keys, top_idx, False), _finalize_selection(last_keys, last_idx, True))


def part_limits(limit: torch.Tensor, row_offset: int, rows: int) -> torch.Tensor:
    """Global limits clamped to a part of the history, global rows [row_offset, row_offset + rows): a
    query whose limit is at or before the part takes none of its rows, one past it takes all of them.
    For the whole history (row_offset 0, every limit in [0, N]) they are the limits themselves."""
    return limit.clamp(row_offset, row_offset + rows)


def topk_state(q: torch.Tensor, history: History, k: int, limit: torch.Tensor, chunk_rows: Optional[int],
               row_offset: int = 0) -> tuple:
    """The merge state of history_topk over `history`, whose row t is global row row_offset + t."""
    width = history.shape[1]
    state_shape = (q.shape[0], q.shape[1], k)
    top_keys = torch.full(state_shape, float("-inf"), device=q.device)
    top_idx = torch.full(state_shape, PAD_INDEX, dtype=torch.int64, device=q.device)
    state = (top_keys, top_idx, top_keys.clone(), top_idx.clone())
    lim = part_limits(limit, row_offset, history.shape[0])
    stop = int(lim.max()) - row_offset
    rows_per_chunk = stream.rows_per_chunk(chunk_rows, width * history.dtype.itemsize, (history,), q.device)
    for offset, rows in stream.chunks(history, rows_per_chunk, stop, q.device):
        state = _ops.history_topk_merge(q, rows, row_offset + offset, lim, *state)
    return state


@NOT_DIFFERENTIABLE
def history_topk(
    queries: torch.Tensor,
    history: History,
    k: int = 10,
    *,
    limit: Union[int, torch.Tensor, None] = None,
    heads: Optional[int] = None,
    chunk_rows: Optional[int] = None,
) -> HistoryTopK:
    """Top-k and last-k history rows per (query, head), by the dual-form weighting factor.

    The score of row t for query q and head h is ``<history[t, h*Dh:(h+1)*Dh], queries[q, h]>``
    accumulated in fp32 (Eq. 6 of arXiv 2310.05884 for attention heads, Eq. 8 with H = 1 for the FFN).
    ``queries`` is [Q, D] (one head, or ``heads`` heads of D/heads) or [Q, H, Dh]; ``history`` is an
    [N, H*Dh] fp32/fp16/bf16 tensor or a HistoryStore field. Only rows ``t < limit[q]`` are candidates.
    Both selections come from one pass; ties go to the lower row; missing entries are index -1 with
    value -inf (top) / +inf (last). The [Q, N] score matrix is never materialised.
    Not differentiable (see :data:`NOT_DIFFERENTIABLE`): the result never requires grad.
    """
    n, width = shape_of("history", history)
    q = as_heads(queries, width, heads, {"history": history})
    check_k(k, n)
    lim = limit_tensor(limit, q.shape[0], n, q.device)
    return finalize_topk(topk_state(q, history, k, lim, chunk_rows))


# --------------------------------------------------------------------------------------------------
# history_label_mass


@NOT_DIFFERENTIABLE
def history_label_mass(
    queries: torch.Tensor,
    history: History,
    labels: Union[torch.Tensor, RowSource],
    num_labels: int,
    *,
    limit: Union[int, torch.Tensor, None] = None,
    heads: Optional[int] = None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Sum of the scores of ``history_topk`` per label: fp32 [Q, H, num_labels].

    How much weight each cluster of the history (a seed, a next token) gets from each query head.
    ``labels`` is int64 [N] (a tensor or a store metadata column) with values in [0, num_labels).
    Not differentiable (see :data:`NOT_DIFFERENTIABLE`): the result never requires grad.
    """
    n, width = shape_of("history", history)
    q = check_label_mass_args(queries, history, labels, num_labels, heads)
    lim = limit_tensor(limit, q.shape[0], n, q.device)
    return label_mass_state(q, history, labels, num_labels, lim, chunk_rows).to(torch.float32)


def check_label_mass_args(queries: torch.Tensor, history: History, labels, num_labels: int,
                          heads: Optional[int]) -> torch.Tensor:
    """history_label_mass's checks of its arguments besides the limit; returns the queries as [Q, H, Dh]."""
    n, width = history.shape
    if not isinstance(labels, torch.Tensor) and not hasattr(labels, "iter_chunks"):
        raise TypeError(f"labels must be an integer tensor [N] or a HistoryStore column, got {type(labels).__name__}")
    q = as_heads(queries, width, heads, {"history": history, "labels": labels})
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels <= 0:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape [N] = [{n}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    return q


def label_mass_state(q: torch.Tensor, history: History, labels, num_labels: int, limit: torch.Tensor,
                     chunk_rows: Optional[int], row_offset: int = 0) -> torch.Tensor:
    """The fp64 mass [Q, H, L] of the rows of `history` (row t is global row row_offset + t) below each
    query's limit."""
    width = history.shape[1]
    sums = torch.zeros(num_labels, width, dtype=torch.float64, device=q.device)
    mass = torch.zeros(q.shape[0], q.shape[1], num_labels, dtype=torch.float64, device=q.device)
    lim = part_limits(limit, row_offset, history.shape[0])
    row_bytes = width * history.dtype.itemsize + labels.dtype.itemsize
    rows_per_chunk = stream.rows_per_chunk(chunk_rows, row_bytes, (history, labels), q.device)
    stop = int(lim.max()) - row_offset
    for offset, (rows, lab) in stream.zip_chunks([history, labels], rows_per_chunk, stop, q.device):
        sums, mass = _ops.history_label_mass_merge(q, rows, lab.to(torch.int64), row_offset + offset, lim, sums, mass)
    return mass


# --------------------------------------------------------------------------------------------------
# dual_form_apply


@NOT_DIFFERENTIABLE
def dual_form_apply(
    queries: torch.Tensor,
    inputs: History,
    errors: History,
    *,
    limit: Union[int, torch.Tensor, None] = None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """A linear layer's output rebuilt from its training history: fp32 [Q, D_out].

    ``out[q] = sum_{t < limit[q]} errors[t] * <inputs[t], queries[q]>`` (the dual form of Irie et al.
    2022; with plain SGD, W = W0 + sum_t e_t x_t^T, so W x = W0 x + this). ``inputs`` is [N, D_in],
    ``errors`` [N, D_out]; rows are summed in fp32 within 8192-row units and the units in fp64.
    Not differentiable (see :data:`NOT_DIFFERENTIABLE`): the result never requires grad.
    """
    n = shape_of("inputs", inputs)[0]
    q = check_dual_form_args(queries, inputs, errors)
    lim = limit_tensor(limit, q.shape[0], n, q.device)
    return dual_form_state(q, inputs, errors, lim, chunk_rows).to(torch.float32)


def check_dual_form_args(queries: torch.Tensor, inputs: History, errors: History,
                         allow_empty: bool = False) -> torch.Tensor:
    """dual_form_apply's checks of its arguments besides the limit; returns the queries as [Q, D_in]."""
    n, d_in = shape_of("inputs", inputs, allow_empty)
    n_err = shape_of("errors", errors, allow_empty)[0]
    if n_err != n:
        raise ValueError(f"errors has {n_err} rows but inputs has {n}")
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        raise ValueError("queries must be a 2-D tensor [Q, D_in]")
    return as_heads(queries, d_in, None, {"inputs": inputs, "errors": errors})[:, 0, :].contiguous()


def dual_form_state(q: torch.Tensor, inputs: History, errors: History, limit: torch.Tensor,
                    chunk_rows: Optional[int], row_offset: int = 0) -> torch.Tensor:
    """The fp64 outputs [Q, D_out] of the rows of inputs/errors (row t is global row row_offset + t)
    below each query's limit."""
    d_in, d_out = inputs.shape[1], errors.shape[1]
    delta = torch.zeros(d_out, d_in, dtype=torch.float64, device=q.device)
    out = torch.zeros(q.shape[0], d_out, dtype=torch.float64, device=q.device)
    lim = part_limits(limit, row_offset, inputs.shape[0])
    row_bytes = d_in * inputs.dtype.itemsize + d_out * errors.dtype.itemsize
    rows_per_chunk = stream.rows_per_chunk(chunk_rows, row_bytes, (inputs, errors), q.device)
    stop = int(lim.max()) - row_offset
    for offset, (x, e) in stream.zip_chunks([inputs, errors], rows_per_chunk, stop, q.device):
        delta, out = _ops.dual_form_apply_merge(q, x, e, row_offset + offset, lim, delta, out)
    return out


# --------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, so the ops trace under torch.compile.


@torch.library.register_fake("metaclm_ext::history_topk_merge")
def _(queries, history, row_offset, limit, top_keys, top_indices, last_keys, last_indices):
    return (
        torch.empty_like(top_keys),
        torch.empty_like(top_indices),
        torch.empty_like(last_keys),
        torch.empty_like(last_indices),
    )


@torch.library.register_fake("metaclm_ext::history_label_mass_merge")
def _(queries, history, labels, row_offset, limit, label_sums, mass):
    return torch.empty_like(label_sums), torch.empty_like(mass)


@torch.library.register_fake("metaclm_ext::dual_form_apply_merge")
def _(queries, inputs, errors, row_offset, limit, weight_delta, out):
    return torch.empty_like(weight_delta), torch.empty_like(out)
