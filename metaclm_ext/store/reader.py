"""Reading a history store: :class:`HistoryStore` (read-only, checked against its manifest) and its
:class:`StoreField` row sources, streamed in chunks read ahead on a background thread with each shard's
CRC-32 verified as it goes, once per shard and store object (docs/store.md has the memory bound and the
throughput).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import queue
import threading
import zlib
from bisect import bisect_right
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..dtypes import HISTORY_DTYPE_NAMES
from ..stream import DEFAULT_CHUNK_BYTES
from ._format import (BUFFER_DTYPES, COLUMN_DTYPES, DEFAULT_READAHEAD, DISK_DTYPES, MANIFEST, ShardFile, Spec,
                      StoreError, check_int, checksum_error, crc_span, load_manifest, open_regular,
                      open_shard_files)

__all__ = ["HistoryStore", "StoreField", "StoreRows"]


class _RowReader:
    """Reads rows [start, stop) of one field in order into caller buffers, shard by shard.

    With ``verify`` every byte of each touched shard not in ``verified`` passes through CRC-32 (bytes
    before `start` or after `stop` are read for the checksum only) and a mismatch raises StoreError once
    the shard is done, so a read that completes has seen only verified bytes; a shard whose checksum
    matched is added to ``verified`` (its store object's set: committed shards are immutable).
    """

    def __init__(self, files: list[ShardFile], starts: list[int], row_bytes: int, start: int, verify: bool,
                 verified: set):
        self.files, self.starts, self.row_bytes, self.verify = files, starts, row_bytes, verify
        self.verified = verified
        self.pos = start
        self.shard = -1  # index of the open shard
        self.f = None
        self.checking = False  # whether the open shard's bytes go through CRC-32
        self.crc = 0

    def _open(self, i: int) -> None:
        sf = self.files[i]
        self.f = open_regular(sf.path, "shard file")
        self.shard = i
        skip = sf.offset + (self.pos - self.starts[i]) * self.row_bytes
        self.checking = self.verify and sf.path not in self.verified
        if self.checking:
            self.crc = crc_span(self.f, skip, 0, sf.path)
        else:
            self.f.seek(skip)

    def _finish_shard(self) -> None:
        sf, f = self.files[self.shard], self.f
        self.f, self.shard = None, -1
        try:
            if self.checking:
                crc = crc_span(f, sf.nbytes - f.tell(), self.crc, sf.path)
                if f.read(1):
                    raise StoreError(f"shard file {sf.path} is longer than the {sf.nbytes} bytes the manifest says")
                if crc != sf.crc32:
                    raise checksum_error(sf, crc)
                self.verified.add(sf.path)
        finally:
            f.close()

    def read_into(self, out: memoryview, rows: int) -> None:
        """Fill `out` (bytes of `rows` rows) with the next rows."""
        done = 0
        while done < rows:
            i = bisect_right(self.starts, self.pos) - 1
            if i != self.shard:
                if self.f is not None:
                    self._finish_shard()
                self._open(i)
            take = min(rows - done, self.starts[i + 1] - self.pos)
            view = out[done * self.row_bytes : (done + take) * self.row_bytes]
            got = 0
            while got < view.nbytes:
                n = self.f.readinto(view[got:])
                if not n:
                    raise StoreError(f"shard file {self.files[i].path} is truncated (ended {view.nbytes - got} bytes early)")
                got += n
            if self.checking:
                self.crc = zlib.crc32(view, self.crc)
            done += take
            self.pos += take
            if self.pos == self.starts[i + 1]:
                self._finish_shard()

    def close(self, verify_rest: bool = True) -> None:
        """Release the open shard; with `verify_rest`, first read the rest of it for its checksum."""
        if self.f is None:
            return
        if verify_rest:
            self._finish_shard()
        else:
            self.f.close()
            self.f, self.shard = None, -1


class _Failure(NamedTuple):
    exc: BaseException


_END = object()


def _readahead(chunks: Iterator, depth: int) -> Iterator:
    """Run the generator `chunks` on a background thread, at most `depth` items ahead of the consumer.

    File reads and CRC-32 release the GIL, so they overlap the consumer's kernels. Errors are re-raised
    in the consumer; abandoning or closing the iterator stops the thread.
    """
    if depth <= 0:
        yield from chunks
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stopping = threading.Event()

    def put(item) -> bool:
        while not stopping.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in chunks:
                if not put(item):
                    return
                del item  # hold no chunk while reading the next one: keeps the memory bound
            put(_END)
        except BaseException as exc:  # re-raised in the consumer
            put(_Failure(exc))
        finally:
            chunks.close()

    thread = threading.Thread(target=work, name="metaclm-store-readahead", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
            item = None
    finally:
        stopping.set()
        thread.join()


class StoreField:
    """One field ([N, width] floats) or metadata column ([N] ints) of a HistoryStore, as a row source.

    Accepted by ``history_topk``/``history_label_mass``/``dual_form_apply`` wherever they take a history
    tensor (a column where they take labels): they call :meth:`iter_chunks`. A field of
    :meth:`HistoryStore.rows` holds the store's rows [start, stop) only, as its rows [0, stop - start).
    """

    def __init__(self, store: "HistoryStore", spec: Spec, start: int = 0, stop: Optional[int] = None):
        self.store, self._spec = store, spec
        self.name = spec.name
        self.start = start
        self.shape = ((len(store) if stop is None else stop) - start, *spec.row_shape)
        self.dtype = (HISTORY_DTYPE_NAMES if spec.width else COLUMN_DTYPES)[spec.dtype]
        self.device = torch.device("cpu")
        self.chunk_bytes = store.chunk_bytes  # the ops size their chunks by this budget

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        rows = f", rows=[{self.start}, {self.start + self.shape[0]})" if self.shape[0] != len(self.store) else ""
        return (f"StoreField({self.name!r}, shape={list(self.shape)}, dtype={self._spec.dtype}, "
                f"store={str(self.store.path)!r}{rows})")

    def iter_chunks(self, chunk_rows: Optional[int] = None, stop: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(row_offset, rows) for consecutive blocks of rows [0, stop), read ahead on a background thread.

        ``chunk_rows`` defaults to the store's ``chunk_bytes`` budget. Chunks may span shards. Every
        chunk is a fresh tensor (safe to keep). Checksums are verified as shards go by, the first time this
        store object reads each shard (unless the store was opened with ``verify=False``); a bad shard
        raises StoreError before the iteration ends.
        """
        n = self.shape[0]
        stop = n if stop is None else check_int("stop", stop)
        if not 0 <= stop <= n:
            raise ValueError(f"stop must be in [0, N = {n}], got {stop}")
        if chunk_rows is None:
            chunk_rows = max(1, self.store.chunk_bytes // self._spec.row_bytes)
        elif check_int("chunk_rows", chunk_rows) <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        return _readahead(self._chunks(int(chunk_rows), stop), self.store.readahead)

    def _chunks(self, chunk_rows: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        reader = self.store._reader(self.name, self.start)
        done = False
        try:
            for start in range(0, stop, chunk_rows):
                rows = min(chunk_rows, stop - start)
                buf = _chunk_buffer((rows, *self._spec.row_shape), BUFFER_DTYPES[self._spec.dtype])
                reader.read_into(memoryview(buf.numpy()).cast("B"), rows)
                yield start, buf.view(self.dtype)
                del buf
            reader.close()  # checks the rest of the last shard when `stop` falls inside it
            done = True
        finally:
            if not done:
                reader.close(verify_rest=False)

    def read(self, start: int = 0, stop: Optional[int] = None, *, raw: bool = False) -> np.ndarray:
        """Rows [start, stop) of this field as a numpy array (see :meth:`HistoryStore.read`)."""
        start, stop = _row_range(self.shape[0], start, stop)
        return self.store.read(self.name, self.start + start, self.start + stop, raw=raw)


def _row_range(n: int, start: int, stop: Optional[int]) -> tuple[int, int]:
    """(start, stop) checked to lie in [0, n]; stop None means n."""
    stop = n if stop is None else check_int("stop", stop)
    start = check_int("start", start)
    if not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start <= stop <= N = {n}, got start={start}, stop={stop}")
    return start, stop


def _chunk_buffer(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A fresh chunk buffer in its own anonymous mapping, unmapped as soon as the last view of it is dropped.

    With malloc, chunks allocated on the read-ahead thread and freed on the consumer's thread linger in the
    thread's arena, and RSS drifts to several times the budget; a mapping per chunk keeps the bound exact.
    """
    mapping = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # 2 MiB pages: far fewer page faults when the chunk is filled
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)



def _open_consistent(root: Path, attempts: int = 3) -> tuple[dict, dict[str, Spec], dict[str, list[ShardFile]]]:
    """A manifest, its specs and its checked shard files, all of one commit.

    A writer committing while the store opens replaces the partial last shard and deletes its files, so
    a file the manifest just read names can vanish: when the manifest changed meanwhile, it is read again.
    """
    for _ in range(attempts):
        manifest, specs = load_manifest(root)
        try:
            return manifest, specs, open_shard_files(root, manifest, specs)
        except StoreError:
            if load_manifest(root)[0] == manifest:
                raise  # the store is damaged, not moving
    raise StoreError(f"history store {root} changed while it was being opened ({attempts} times): a writer is "
                     "committing to it; open it again after the writer flushes or closes")


class HistoryStore:
    """A history store opened read-only.

    Opening checks the manifest against every shard file (present, size, .npy header dtype and shape) and
    raises StoreError naming the first file that disagrees; checksums are verified as shards are read
    (``verify=False`` skips that), each shard's once per store object: a committed shard is never
    rewritten, so a later pass over it (a second call over the same field, a benchmark's repeats) skips
    the CRC-32 that the first pass checked; a shard that failed is checked again on every read.
    :meth:`verify` always checks every file. ``chunk_bytes`` is the streaming budget: the ops read chunks
    of at most that many bytes (summed over the sources they stream together), with ``readahead`` chunks
    per source queued ahead, so peak memory is about ``(readahead + 3) * chunk_bytes`` whatever the store
    size.
    """

    def __init__(self, path: Union[str, os.PathLike], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 readahead: int = DEFAULT_READAHEAD, verify: bool = True):
        if check_int("chunk_bytes", chunk_bytes) <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if check_int("readahead", readahead) < 0:
            raise ValueError(f"readahead must be >= 0, got {readahead}")
        self.path = Path(path)
        self.chunk_bytes, self.readahead, self.verify_reads = int(chunk_bytes), int(readahead), bool(verify)
        self._manifest, self._specs, self._files = _open_consistent(self.path)
        self._verified: set[Path] = set()  # shard files whose CRC-32 matched on a read through this object
        self._starts = [0]
        for shard in self._manifest["shards"]:
            self._starts.append(self._starts[-1] + shard["rows"])

    # -- description ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._manifest["rows"]

    def __repr__(self) -> str:
        return f"HistoryStore({str(self.path)!r}, rows={len(self)}, names={list(self._specs)})"

    def __contains__(self, name) -> bool:
        return name in self._specs

    @property
    def fields(self) -> dict[str, tuple[int, str]]:
        return {s.name: (s.width, s.dtype) for s in self._specs.values() if s.width is not None}

    @property
    def columns(self) -> dict[str, str]:
        return {s.name: s.dtype for s in self._specs.values() if s.width is None}

    @property
    def attrs(self) -> dict:
        return json.loads(json.dumps(self._manifest.get("attrs", {})))  # a copy: the store is read-only

    @property
    def shard_rows(self) -> int:
        return self._manifest["shard_rows"]

    @property
    def num_shards(self) -> int:
        return len(self._manifest["shards"])

    @property
    def shard_starts(self) -> list[int]:
        """The first row of each shard, then N: shard i holds rows [shard_starts[i], shard_starts[i + 1])."""
        return list(self._starts)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: every shard file plus the manifest."""
        return sum(sf.nbytes for files in self._files.values() for sf in files) + (self.path / MANIFEST).stat().st_size

    def __getitem__(self, name: str) -> StoreField:
        return StoreField(self, self._spec(name))

    def rows(self, start: int, stop: int) -> "StoreRows":
        """The store's rows [start, stop) as a store of their own: its fields stream (and verify) only the
        shards those rows touch, for a rank of a distributed operator that holds that part."""
        return StoreRows(self, *_row_range(len(self), start, stop))

    def _spec(self, name: str) -> Spec:
        if name not in self._specs:
            raise KeyError(f"{name!r} is not in store {self.path} (it has {sorted(self._specs)})")
        return self._specs[name]

    # -- reading -------------------------------------------------------------------------------------
    def _reader(self, name: str, start: int) -> _RowReader:
        return _RowReader(self._files[name], self._starts, self._specs[name].row_bytes, start, self.verify_reads,
                          self._verified)

    def read(self, name: str, start: int = 0, stop: Optional[int] = None, *, raw: bool = False) -> np.ndarray:
        """Rows [start, stop) of a field or column as a numpy array, read whole (not streamed).

        bfloat16 fields come back as float32 (exact; numpy has no bfloat16), or with ``raw=True`` as the
        uint16 bits stored on disk.
        """
        spec = self._spec(name)
        start, stop = _row_range(len(self), start, stop)
        out = np.empty((stop - start, *spec.row_shape), dtype=DISK_DTYPES[spec.dtype])
        if stop > start:
            reader = self._reader(name, start)
            try:
                reader.read_into(memoryview(out).cast("B"), stop - start)
            except BaseException:
                reader.close(verify_rest=False)
                raise
            reader.close()
        if spec.dtype == "bfloat16" and not raw:
            return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float().numpy()
        return out

    def read_tensor(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows [start, stop) as a torch tensor in the stored dtype (bfloat16 included)."""
        raw = self.read(name, start, stop, raw=True)
        if self._spec(name).dtype == "bfloat16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)

    def verify(self, progress: bool = False) -> None:
        """Read every shard file whole and check its CRC-32; StoreError lists every bad file."""
        files = [sf for name in self._specs for sf in self._files[name]]
        problems = []
        with tqdm(total=sum(sf.nbytes for sf in files), unit="B", unit_scale=True, desc="verify",
                  disable=not progress) as bar:
            for sf in files:
                try:
                    with open_regular(sf.path, "shard file") as f:
                        crc = crc_span(f, sf.nbytes, 0, sf.path, bar.update)
                        if f.read(1):
                            raise StoreError(f"shard file {sf.path} is longer than the manifest says")
                    if crc != sf.crc32:
                        raise checksum_error(sf, crc)
                except StoreError as exc:
                    problems.append(str(exc))
        if problems:
            raise StoreError(f"{len(problems)} bad shard file(s) in {self.path}:\n" + "\n".join(problems))


class StoreRows:
    """Rows [start, stop) of a :class:`HistoryStore` (from :meth:`HistoryStore.rows`): indexing by a name
    gives that field or column over these rows only, as rows [0, stop - start)."""

    def __init__(self, store: HistoryStore, start: int, stop: int):
        self.store, self.start, self.stop = store, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"StoreRows({str(self.store.path)!r}, rows=[{self.start}, {self.stop}))"

    def __contains__(self, name) -> bool:
        return name in self.store

    def __getitem__(self, name: str) -> StoreField:
        return StoreField(self.store, self.store._spec(name), self.start, self.stop)
