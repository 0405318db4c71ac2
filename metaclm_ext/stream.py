"""The streaming engine under the ops: a history as consecutive row chunks, whatever holds it.

A history is a tensor or any *row source* (``shape``, ``dtype``, ``device`` and ``iter_chunks(chunk_rows,
stop)``, such as a field of a :class:`metaclm_ext.store.HistoryStore`). The ops fold it into their
merge operators chunk by chunk, so memory is bounded by the chunk size; a CPU row source beside CUDA
queries is staged through pinned buffers with reads, copies and kernels overlapped.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Iterator, Optional, Protocol, Union

import torch

from .dtypes import HISTORY_DTYPES

__all__ = ["DEFAULT_CHUNK_BYTES", "History", "RowSource", "TensorRows", "chunks", "rows_per_chunk", "source_chunks",
           "staged_chunks", "zip_chunks"]

DEFAULT_CHUNK_BYTES = 64 << 20


class RowSource(Protocol):
    """Anything that yields consecutive row blocks of a 2-D history."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device

    def iter_chunks(self, chunk_rows: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]: ...


History = Union[torch.Tensor, RowSource]


class TensorRows:
    """A CPU tensor (or np.memmap via torch.from_numpy) as a row source, so that CUDA queries can stream
    it through pinned buffers. A plain CPU tensor beside CUDA queries is refused on purpose: copying the
    whole history over PCIe on every call should be asked for, not happen by accident."""

    def __init__(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            raise TypeError(f"TensorRows wraps a CPU tensor, got {type(tensor).__name__} on {getattr(tensor, 'device', '?')}")
        self.tensor = tensor
        self.shape, self.dtype, self.device = tuple(tensor.shape), tensor.dtype, tensor.device

    def iter_chunks(self, chunk_rows: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        return _tensor_chunks(self.tensor, chunk_rows, stop)


# --------------------------------------------------------------------------------------------------
# Chunks


def rows_per_chunk(chunk_rows: Optional[int], row_bytes: int, sources: tuple, device: torch.device) -> int:
    """Rows per chunk: explicit; else all rows at once when every source is a contiguous CPU tensor that
    a CPU kernel reads as it is (its chunks would be views, and each chunk costs a merge call: a fork
    and join of the threads and a copy of the state); else the chunk budget (the smallest
    ``chunk_bytes`` of the sources that carry one, as store fields do; DEFAULT_CHUNK_BYTES otherwise)
    over the bytes of one row of all sources."""
    if chunk_rows is None:
        if device.type == "cpu" and all(_read_in_place(s) for s in sources):
            return max(1, sources[0].shape[0])
        budget = min((int(s.chunk_bytes) for s in sources if hasattr(s, "chunk_bytes")), default=DEFAULT_CHUNK_BYTES)
        return max(1024, budget // max(1, row_bytes))
    if int(chunk_rows) <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return int(chunk_rows)


def _read_in_place(source: History) -> bool:
    """A contiguous CPU tensor of a history dtype or int64 (labels): a CPU kernel reads it without a copy."""
    return (isinstance(source, torch.Tensor) and source.device.type == "cpu" and source.is_contiguous()
            and source.dtype in HISTORY_DTYPES + (torch.int64,))


def _tensor_chunks(tensor: torch.Tensor, chunk_rows: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, stop, chunk_rows):
        yield start, tensor[start : min(stop, start + chunk_rows)]


def source_chunks(source: RowSource, chunk_rows: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
    """A row source's chunks, checked to cover [0, stop) in order: a gap or a short stream is an error."""
    expected = 0
    for offset, rows in source.iter_chunks(chunk_rows, stop):
        if offset != expected:
            raise RuntimeError(f"row source jumped to row {offset}, expected {expected}")
        expected += rows.shape[0]
        yield offset, rows
    if expected != stop:
        raise RuntimeError(f"row source ended at row {expected}, expected {stop}")


def staged_chunks(source: RowSource, chunk_rows: int, stop: int, device: torch.device, depth: int = 2):
    """CPU row-source chunks delivered on a CUDA device with reads, copies and kernels overlapped.

    A reader thread fills `depth` pinned host buffers from the source; each filled buffer is copied to
    one of `depth` device buffers on a side stream, one chunk ahead of the chunk being computed, and
    the compute stream waits on that copy only. Device memory is `depth` chunks whatever the history.
    """
    copy_stream, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    shape = (chunk_rows, *source.shape[1:])
    pinned = [torch.empty(shape, dtype=source.dtype, pin_memory=True) for _ in range(depth)]
    on_device = [torch.empty(shape, dtype=source.dtype, device=device) for _ in range(depth)]
    consumed = [None] * depth  # compute-stream event: the kernels reading on_device[slot] are done
    free, filled = queue.Queue(), queue.Queue()
    for slot in range(depth):
        free.put((slot, None))
    stopping = threading.Event()

    def reader():
        try:
            for offset, rows in source_chunks(source, chunk_rows, stop):
                slot, copied = free.get()
                if stopping.is_set():
                    return
                if copied is not None:
                    copied.synchronize()  # the previous copy out of this pinned buffer has finished
                pinned[slot][: rows.shape[0]].copy_(rows)
                filled.put((slot, offset, rows.shape[0]))
            filled.put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            filled.put(exc)

    thread = threading.Thread(target=reader, name="metaclm-stage", daemon=True)
    thread.start()
    pending = deque()

    def start_copy() -> bool:
        item = filled.get()
        if item is None:
            return False
        if isinstance(item, BaseException):
            raise item
        slot, offset, n = item
        with torch.cuda.stream(copy_stream):
            if consumed[slot] is not None:
                copy_stream.wait_event(consumed[slot])
            on_device[slot][:n].copy_(pinned[slot][:n], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        free.put((slot, copied))
        pending.append((slot, offset, n, copied))
        return True

    try:
        more = start_copy()
        while pending:
            if more:
                more = start_copy()  # chunk i + 1 crosses the bus while chunk i is computed
            slot, offset, n, copied = pending.popleft()
            compute.wait_event(copied)
            yield offset, on_device[slot][:n]
            consumed[slot] = torch.cuda.Event()
            consumed[slot].record(compute)
    finally:  # also on an early exit (a kernel raised; CPython closes the abandoned generator at once)
        stopping.set()
        free.put((0, None))  # wakes a reader blocked on a free buffer
        thread.join()
        compute.wait_stream(copy_stream)  # a prefetched copy must land before its buffer is reused


def chunks(source: History, chunk_rows: int, stop: int, device: Optional[torch.device] = None):
    """Consecutive (row_offset, rows) blocks of rows [0, stop), on `device` when that is a CUDA device
    and the source is a CPU row source."""
    staged = device is not None and device.type == "cuda" and torch.device(source.device).type == "cpu"
    if staged and not isinstance(source, torch.Tensor):
        yield from staged_chunks(source, chunk_rows, stop, device)
    elif isinstance(source, torch.Tensor):
        yield from _tensor_chunks(source, chunk_rows, stop)
    else:
        yield from source_chunks(source, chunk_rows, stop)


def zip_chunks(sources: list, chunk_rows: int, stop: int, device: torch.device) -> Iterator[tuple[int, list]]:
    """Row-aligned chunks of several sources (inputs with errors, history with labels).

    Not built on zip(): its cached result tuple keeps an older chunk alive, a third chunk in memory.
    """
    streams = [chunks(s, chunk_rows, stop, device) for s in sources]
    try:
        for first in streams[0]:
            parts = [first] + [next(s, None) for s in streams[1:]]
            if any(p is None for p in parts):
                raise RuntimeError("row sources went out of step: one ended early")
            offsets = {p[0] for p in parts}
            lengths = {p[1].shape[0] for p in parts}
            if len(offsets) != 1 or len(lengths) != 1:
                raise RuntimeError(f"row sources went out of step: offsets {offsets}, lengths {lengths}")
            yield first[0], [p[1] for p in parts]
            del first, parts  # hold no chunk while the next ones are read
        if any(next(s, None) is not None for s in streams[1:]):
            raise RuntimeError("row sources went out of step: one has rows beyond the others")
    finally:  # stop the other streams (a store field's read-ahead thread) now, even if one failed
        for s in streams:
            s.close()
