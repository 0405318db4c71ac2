"""The stores of the ranks of a data-parallel recording, opened as one history.

Under DistributedDataParallel each rank records its own store (its own micro-batches at every step).
:func:`open_ranks` reads them as one history in **step-major** order: the rows of step s from rank 0,
then those of step s from rank 1, ..., then step s + 1; within a rank and a step, its own row order.
That is the order a single process that ran every rank's micro-batches of a step in rank order would
have recorded, so the single-process operators (and analysis code that streams fields) read it
unchanged. Each store is still read front to back once per stream, with its checksums verified.
"""
from __future__ import annotations

import os
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from ..store import HistoryStore
from ..store.scales import SCALES, field_scale
from ..stream import DEFAULT_CHUNK_BYTES

__all__ = ["RankStores", "RankField", "open_ranks"]

STEP = "step"


class Segment(NamedTuple):
    rank: int  # which store
    start: int  # its rows [start, stop)
    stop: int


def _step_runs(store: HistoryStore, rank: int) -> list[tuple[int, Segment]]:
    """(step, rows of that step) for each run of equal steps in a store, which must not go back."""
    runs, offset, last = [], 0, None
    for _, steps in store[STEP].iter_chunks():
        steps = steps.numpy()
        if np.any(np.diff(steps) < 0) or (len(steps) and last is not None and steps[0] < last):
            raise ValueError(f"{store.path}: the step column goes back (near row {offset}): not a recording")
        cuts = np.flatnonzero(np.diff(steps)) + 1
        for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(steps)]])):
            step = int(steps[a])
            if runs and runs[-1][0] == step and runs[-1][1].stop == offset + a:  # a run across chunks
                runs[-1] = (step, Segment(rank, runs[-1][1].start, offset + int(b)))
            else:
                runs.append((step, Segment(rank, offset + int(a), offset + int(b))))
        offset += len(steps)
        last = int(steps[-1]) if len(steps) else last
    return runs


class _Rows:
    """A store field's rows in order, handed out in pieces of any size."""

    def __init__(self, chunks: Iterator[tuple[int, torch.Tensor]]):
        self.chunks, self.current, self.pos = chunks, None, 0

    def take(self, n: int) -> list[torch.Tensor]:
        pieces = []
        while n:
            if self.current is None or self.pos == self.current.shape[0]:
                self.current, self.pos = next(self.chunks)[1], 0
            m = min(n, self.current.shape[0] - self.pos)
            pieces.append(self.current[self.pos : self.pos + m])
            self.pos, n = self.pos + m, n - m
        return pieces


class RankField:
    """One field or column of :class:`RankStores`, a row source in step-major order."""

    def __init__(self, ranks: "RankStores", name: str):
        first = ranks.stores[0][name]
        self.ranks, self.name = ranks, name
        self.shape = (len(ranks), *first.shape[1:])
        self.dtype, self.device, self.chunk_bytes = first.dtype, first.device, first.chunk_bytes
        self._row_bytes = max(1, int(np.prod(first.shape[1:], dtype=np.int64)) * first.dtype.itemsize)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"RankField({self.name!r}, shape={list(self.shape)}, ranks={len(self.ranks.stores)})"

    def iter_chunks(self, chunk_rows: Optional[int] = None, stop: Optional[int] = None):
        """(row_offset, rows) for consecutive blocks of global rows [0, stop)."""
        n = self.shape[0]
        stop = n if stop is None else int(stop)
        if not 0 <= stop <= n:
            raise ValueError(f"stop must be in [0, N = {n}], got {stop}")
        chunk_rows = max(1, self.chunk_bytes // self._row_bytes) if chunk_rows is None else int(chunk_rows)
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        return self._chunks(chunk_rows, stop)

    def _chunks(self, chunk_rows: int, stop: int):
        streams = [store[self.name].iter_chunks(chunk_rows) for store in self.ranks.stores]
        rows = [_Rows(s) for s in streams]
        segments = iter(self.ranks.segments)
        segment, left = None, 0
        try:
            for start in range(0, stop, chunk_rows):
                need, pieces = min(chunk_rows, stop - start), []
                while need:
                    if not left:
                        segment = next(segments)
                        left = segment.stop - segment.start
                    m = min(need, left)
                    pieces += rows[segment.rank].take(m)
                    need, left = need - m, left - m
                yield start, torch.cat(pieces)
        finally:
            for s in streams:
                s.close()

    def read(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Global rows [start, stop) as one tensor (streamed from the first row: for checks, not bulk)."""
        stop = self.shape[0] if stop is None else stop
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"need 0 <= start <= stop <= N = {self.shape[0]}, got start={start}, stop={stop}")
        parts = [rows for offset, rows in self.iter_chunks(stop=stop) if offset + rows.shape[0] > start]
        if not parts:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        whole = torch.cat(parts)
        return whole[whole.shape[0] - (stop - start):]


class RankStores:
    """Several ranks' stores as one history (see the module docstring); index it by field or column."""

    def __init__(self, stores: list[HistoryStore]):
        if not stores:
            raise ValueError("open_ranks needs at least one store")
        names = [dict(s.fields, **s.columns) for s in stores]
        for store, layout in zip(stores[1:], names[1:]):
            if layout != names[0]:
                raise ValueError(f"{store.path} has fields/columns {layout}, but {stores[0].path} has {names[0]}: "
                                 "the ranks must record the same modules")
        scales = [{f: field_scale(s.attrs, f) for f in s.fields} for s in stores]
        for store, theirs in zip(stores[1:], scales[1:]):
            if theirs != scales[0]:
                raise ValueError(f"{store.path} stores its fields times {theirs}, but {stores[0].path} times "
                                 f"{scales[0]} (attrs {SCALES!r}): the ranks' rows cannot be read as one history")
        if STEP not in stores[0]:
            raise ValueError(f"{stores[0].path} has no {STEP!r} column to order the ranks' rows by")
        self.stores = stores
        runs = [run for rank, store in enumerate(stores) for run in _step_runs(store, rank)]
        # step-major: sorted by step, then rank (a stable sort keeps a rank's own order)
        self.segments = [segment for _, segment in sorted(runs, key=lambda run: (run[0], run[1].rank))]

    def __len__(self) -> int:
        return sum(len(s) for s in self.stores)

    def __repr__(self) -> str:
        return f"RankStores({[str(s.path) for s in self.stores]}, rows={len(self)})"

    def __contains__(self, name) -> bool:
        return name in self.stores[0]

    @property
    def fields(self) -> dict:
        return self.stores[0].fields

    @property
    def columns(self) -> dict:
        return self.stores[0].columns

    @property
    def attrs(self) -> dict:
        """Rank 0's store's attrs (every rank's field scales are the same): for ``true_units``."""
        return self.stores[0].attrs

    def __getitem__(self, name: str) -> RankField:
        return RankField(self, name)  # a name the stores lack raises their KeyError


def open_ranks(paths: list[Union[str, os.PathLike]], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               verify: bool = True) -> RankStores:
    """The stores at `paths` (rank 0's first) as one history in step-major order. Opening reads each
    store's step column once (8 bytes a row) to find where its steps begin."""
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a list of store paths, one per rank in rank order")
    return RankStores([HistoryStore(p, chunk_bytes=chunk_bytes, verify=verify) for p in paths])
