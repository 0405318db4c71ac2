"""The training history on disk: a directory of ``.npy`` shards under a JSON manifest, streamed to the ops.

A training run records millions of rows (one per trained token per step: layer inputs and their error
signals, plus integer metadata such as step, seed, next token). :class:`HistoryWriter` appends them in
shards that become visible only once fully written, fsynced and recorded in the manifest (the manifest
rename is the commit point), so a writer killed at any moment leaves a store that opens with every
committed row and can be resumed. :class:`HistoryStore` opens a store read-only, checks the manifest
against the shard files, and hands out :class:`StoreField` row sources that ``history_topk``,
``history_label_mass`` and ``dual_form_apply`` stream in chunks read ahead on a background thread,
verifying each shard's CRC-32 as it goes. The on-disk format is specified in docs/history-store.md.
"""
from __future__ import annotations

import fcntl
import io
import json
import math
import mmap
import os
import queue
import re
import threading
import zlib
from bisect import bisect_right
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch

from .stream import DEFAULT_CHUNK_BYTES

__all__ = ["HistoryStore", "HistoryWriter", "StoreError", "StoreField"]

FORMAT = "metaclm-history-store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"
DATA_DIR = "data"
TMP_SUFFIX = ".tmp"
DEFAULT_SHARD_ROWS = 65536
DEFAULT_READAHEAD = 2

FIELD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COLUMN_DTYPES = {"int32": torch.int32, "int64": torch.int64}
# The numpy dtype of the bytes in each .npy file. bfloat16 has no numpy dtype: its raw bits are stored
# as little-endian uint16 (the upper half of the float32 bit pattern), as the manifest's dtype says.
DISK_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
# torch dtype of the read buffers: bfloat16 is read as int16 bits and reinterpreted with .view.
_BUFFER_DTYPES = {**FIELD_DTYPES, **COLUMN_DTYPES, "bfloat16": torch.int16}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_PIECE = 8 << 20  # bytes per read when a span is read for its checksum only


class StoreError(ValueError):
    """A store on disk is malformed, corrupted or disagrees with its manifest (the message names the file)."""


class _Spec(NamedTuple):
    """One named field (width > 0) or metadata column (width None) of a store."""

    name: str
    dtype: str
    width: Optional[int]

    @property
    def row_shape(self) -> tuple:
        return () if self.width is None else (self.width,)

    @property
    def row_bytes(self) -> int:
        return DISK_DTYPES[self.dtype].itemsize * (self.width or 1)


class _ShardFile(NamedTuple):
    path: Path
    nbytes: int
    crc32: int
    offset: int  # bytes before the first row (the .npy header)


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, npy headers, checksums


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, parts: list) -> tuple[int, int]:
    """Write `parts` (bytes-like) to `path` via a fsynced temporary file and a rename: (bytes, crc32)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    crc, nbytes = 0, 0
    with open(tmp, "wb") as f:
        for part in parts:
            view = memoryview(part).cast("B")
            f.write(view)
            crc = zlib.crc32(view, crc)
            nbytes += view.nbytes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return nbytes, crc


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _read_npy_header(path: Path) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a .npy file, or StoreError naming it."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read[version](f)
            return shape, fortran, dtype, f.tell()
    except FileNotFoundError:
        raise StoreError(f"shard file {path} is missing") from None
    except (ValueError, OSError, SyntaxError) as exc:
        raise StoreError(f"shard file {path} has no valid .npy header ({exc})") from None


def _crc_span(f, nbytes: int, crc: int, path: Path, on_bytes: Optional[Callable[[int], None]] = None) -> int:
    """CRC-32 continued over the next `nbytes` of `f`, read in bounded pieces."""
    buf = bytearray(min(_PIECE, max(nbytes, 1)))
    view = memoryview(buf)
    while nbytes > 0:
        got = f.readinto(view[: min(nbytes, len(buf))])
        if not got:
            raise StoreError(f"shard file {path} is truncated (ended {nbytes} bytes early)")
        crc = zlib.crc32(view[:got], crc)
        nbytes -= got
        if on_bytes is not None:
            on_bytes(got)
    return crc


def _checksum_error(sf: _ShardFile, crc: int) -> StoreError:
    return StoreError(f"shard file {sf.path} is corrupted: CRC-32 {crc:#010x}, the manifest says {sf.crc32:#010x}")


# --------------------------------------------------------------------------------------------------
# Manifest


def _check_specs(fields: Mapping, columns: Mapping) -> dict[str, _Spec]:
    """Validated specs of create()'s `fields` {name: (width, dtype)} and `columns` {name: dtype}."""
    if not isinstance(fields, Mapping) or not isinstance(columns, Mapping):
        raise TypeError("fields must be a dict {name: (width, dtype)} and columns a dict {name: dtype}")
    specs: dict[str, _Spec] = {}
    for kind, items in (("field", fields), ("column", columns)):
        for name, value in items.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"{kind} name {name!r} must match {_NAME.pattern} (it names files)")
            if name in specs:
                raise ValueError(f"name {name!r} is used twice")
            if kind == "field":
                if not (isinstance(value, (tuple, list)) and len(value) == 2):
                    raise TypeError(f"field {name!r} must be (width, dtype), got {value!r}")
                width, dtype = value
                if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                    raise ValueError(f"field {name!r} width must be a positive int, got {width!r}")
                if dtype not in FIELD_DTYPES:
                    raise ValueError(f"field {name!r} dtype must be one of {sorted(FIELD_DTYPES)}, got {dtype!r}")
            else:
                width, dtype = None, value
                if dtype not in COLUMN_DTYPES:
                    raise ValueError(
                        f"column {name!r} dtype must be int32 or int64, got {dtype!r} (no narrower ints: "
                        "token ids and steps overflow them)"
                    )
            specs[name] = _Spec(name, dtype, width)
    if not specs:
        raise ValueError("a store needs at least one field or column")
    return specs


def _manifest_specs(manifest: dict) -> dict[str, _Spec]:
    fields = {n: (f.get("width"), f.get("dtype")) for n, f in manifest["fields"].items()}
    columns = {n: c.get("dtype") for n, c in manifest["columns"].items()}
    return _check_specs(fields, columns)


def _load_manifest(root: Path) -> tuple[dict, dict[str, _Spec]]:
    """The parsed, structurally checked manifest of the store at `root` and its specs."""
    if not root.exists():
        raise FileNotFoundError(f"history store {root} does not exist")
    if not root.is_dir():
        raise StoreError(f"history store {root} is not a directory")
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{root} is not a history store: {path} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"manifest {path} is not valid JSON ({exc})") from None
    try:
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise ValueError(f"version {manifest.get('version')!r} is not supported (this reader knows {VERSION})")
        specs = _manifest_specs(manifest)
        shard_rows = manifest["shard_rows"]
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows <= 0:
            raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
        total, ids = 0, set()
        for i, shard in enumerate(manifest["shards"]):
            rows, sid = shard["rows"], shard["id"]
            if not isinstance(rows, int) or not 0 < rows <= shard_rows:
                raise ValueError(f"shard {i} has {rows!r} rows (must be in [1, shard_rows = {shard_rows}])")
            if not isinstance(sid, int) or sid < 0 or sid in ids:
                raise ValueError(f"shard {i} has a bad or repeated id {sid!r}")
            ids.add(sid)
            if set(shard["files"]) != set(specs):
                raise ValueError(f"shard {i} has files for {sorted(shard['files'])}, expected {sorted(specs)}")
            for name, entry in shard["files"].items():
                rel = Path(entry["path"])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"shard {i} file path {entry['path']!r} leaves the store")
                if not isinstance(entry["bytes"], int) or not isinstance(entry["crc32"], int):
                    raise ValueError(f"shard {i} file {entry['path']!r} needs int bytes and crc32")
            total += rows
        if manifest["rows"] != total:
            raise ValueError(f"rows is {manifest['rows']!r} but the shards hold {total}")
        if not isinstance(manifest.get("attrs", {}), dict):
            raise ValueError("attrs must be an object")
    except StoreError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise StoreError(f"manifest {path} is malformed: {detail}") from None
    return manifest, specs


def _write_manifest(root: Path, manifest: dict) -> None:
    """The commit point: rows become visible when this rename lands."""
    _write_atomic(root / MANIFEST, [json.dumps(manifest, indent=1).encode()])
    _fsync_dir(root)


def _open_shard_files(root: Path, manifest: dict, specs: dict[str, _Spec]) -> dict[str, list[_ShardFile]]:
    """Per name, the shard files in row order, each checked against the manifest (exists, size, header)."""
    files: dict[str, list[_ShardFile]] = {name: [] for name in specs}
    for shard in manifest["shards"]:
        for name, spec in specs.items():
            entry = shard["files"][name]
            path = root / entry["path"]
            shape, fortran, dtype, offset = _read_npy_header(path)
            want_shape = (shard["rows"], *spec.row_shape)
            if fortran or dtype != DISK_DTYPES[spec.dtype] or tuple(shape) != want_shape:
                raise StoreError(
                    f"shard file {path} holds {dtype} {list(shape)}{' (Fortran order)' if fortran else ''} but "
                    f"the manifest says {spec.name} is {spec.dtype} {list(want_shape)} (stored as {DISK_DTYPES[spec.dtype]})"
                )
            size = path.stat().st_size
            expected = offset + shard["rows"] * spec.row_bytes
            if size != entry["bytes"] or size != expected:
                raise StoreError(
                    f"shard file {path} is {size} bytes; its header implies {expected} and the manifest says "
                    f"{entry['bytes']} (truncated or overwritten)"
                )
            files[name].append(_ShardFile(path, size, entry["crc32"], offset))
    return files


# --------------------------------------------------------------------------------------------------
# Reading


class _RowReader:
    """Reads rows [start, stop) of one field in order into caller buffers, shard by shard.

    With ``verify`` every byte of each touched shard passes through CRC-32 (bytes before `start` or after
    `stop` are read for the checksum only) and a mismatch raises StoreError once the shard is done, so a
    read that completes has seen only verified bytes.
    """

    def __init__(self, files: list[_ShardFile], starts: list[int], row_bytes: int, start: int, verify: bool):
        self.files, self.starts, self.row_bytes, self.verify = files, starts, row_bytes, verify
        self.pos = start
        self.shard = -1  # index of the open shard
        self.f = None
        self.crc = 0

    def _open(self, i: int) -> None:
        sf = self.files[i]
        try:
            self.f = open(sf.path, "rb", buffering=0)
        except FileNotFoundError:
            raise StoreError(f"shard file {sf.path} is missing") from None
        self.shard = i
        skip = sf.offset + (self.pos - self.starts[i]) * self.row_bytes
        if self.verify:
            self.crc = _crc_span(self.f, skip, 0, sf.path)
        else:
            self.f.seek(skip)

    def _finish_shard(self) -> None:
        sf, f = self.files[self.shard], self.f
        self.f, self.shard = None, -1
        try:
            if self.verify:
                crc = _crc_span(f, sf.nbytes - f.tell(), self.crc, sf.path)
                if f.read(1):
                    raise StoreError(f"shard file {sf.path} is longer than the {sf.nbytes} bytes the manifest says")
                if crc != sf.crc32:
                    raise _checksum_error(sf, crc)
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
            if self.verify:
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
    tensor (a column where they take labels): they call :meth:`iter_chunks`.
    """

    def __init__(self, store: "HistoryStore", spec: _Spec):
        self.store, self._spec = store, spec
        self.name = spec.name
        self.shape = (len(store), *spec.row_shape)
        self.dtype = (FIELD_DTYPES if spec.width else COLUMN_DTYPES)[spec.dtype]
        self.device = torch.device("cpu")
        self.chunk_bytes = store.chunk_bytes  # the ops size their chunks by this budget

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StoreField({self.name!r}, shape={list(self.shape)}, dtype={self._spec.dtype}, store={str(self.store.path)!r})"

    def iter_chunks(self, chunk_rows: Optional[int] = None, stop: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(row_offset, rows) for consecutive blocks of rows [0, stop), read ahead on a background thread.

        ``chunk_rows`` defaults to the store's ``chunk_bytes`` budget. Chunks may span shards. Every
        chunk is a fresh tensor (safe to keep). Checksums are verified as shards go by (unless the store was opened
        with ``verify=False``); a bad shard raises StoreError before the iteration ends.
        """
        n = self.shape[0]
        stop = n if stop is None else _check_int("stop", stop)
        if not 0 <= stop <= n:
            raise ValueError(f"stop must be in [0, N = {n}], got {stop}")
        if chunk_rows is None:
            chunk_rows = max(1, self.store.chunk_bytes // self._spec.row_bytes)
        elif _check_int("chunk_rows", chunk_rows) <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        return _readahead(self._chunks(int(chunk_rows), stop), self.store.readahead)

    def _chunks(self, chunk_rows: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        reader = self.store._reader(self.name, 0)
        done = False
        try:
            for start in range(0, stop, chunk_rows):
                rows = min(chunk_rows, stop - start)
                buf = _chunk_buffer((rows, *self._spec.row_shape), _BUFFER_DTYPES[self._spec.dtype])
                reader.read_into(memoryview(buf.numpy()).cast("B"), rows)
                yield start, buf.view(self.dtype)
                del buf
            reader.close()  # checks the rest of the last shard when `stop` falls inside it
            done = True
        finally:
            if not done:
                reader.close(verify_rest=False)

    def read(self, start: int = 0, stop: Optional[int] = None, *, raw: bool = False) -> np.ndarray:
        """Rows [start, stop) as a numpy array (see :meth:`HistoryStore.read`)."""
        return self.store.read(self.name, start, stop, raw=raw)


def _chunk_buffer(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A fresh chunk buffer in its own anonymous mapping, unmapped as soon as the last view of it is dropped.

    With malloc, chunks allocated on the read-ahead thread and freed on the consumer's thread linger in the
    thread's arena, and RSS drifts to several times the budget; a mapping per chunk keeps the bound exact.
    """
    mapping = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # 2 MiB pages: far fewer page faults when the chunk is filled
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


class HistoryStore:
    """A history store opened read-only.

    Opening checks the manifest against every shard file (present, size, .npy header dtype and shape) and
    raises StoreError naming the first file that disagrees; checksums are verified as shards are read
    (``verify=False`` skips that). ``chunk_bytes`` is the streaming budget: the ops read chunks of at most
    that many bytes (summed over the sources they stream together), with ``readahead`` chunks per source
    queued ahead, so peak memory is about ``(readahead + 3) * chunk_bytes`` whatever the store size.
    """

    def __init__(self, path: Union[str, os.PathLike], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 readahead: int = DEFAULT_READAHEAD, verify: bool = True):
        if _check_int("chunk_bytes", chunk_bytes) <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if _check_int("readahead", readahead) < 0:
            raise ValueError(f"readahead must be >= 0, got {readahead}")
        self.path = Path(path)
        self.chunk_bytes, self.readahead, self.verify_reads = int(chunk_bytes), int(readahead), bool(verify)
        self._manifest, self._specs = _load_manifest(self.path)
        self._files = _open_shard_files(self.path, self._manifest, self._specs)
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
    def nbytes(self) -> int:
        """Bytes on disk: every shard file plus the manifest."""
        return sum(sf.nbytes for files in self._files.values() for sf in files) + (self.path / MANIFEST).stat().st_size

    def __getitem__(self, name: str) -> StoreField:
        return StoreField(self, self._spec(name))

    def _spec(self, name: str) -> _Spec:
        if name not in self._specs:
            raise KeyError(f"{name!r} is not in store {self.path} (it has {sorted(self._specs)})")
        return self._specs[name]

    # -- reading -------------------------------------------------------------------------------------
    def _reader(self, name: str, start: int) -> _RowReader:
        return _RowReader(self._files[name], self._starts, self._specs[name].row_bytes, start, self.verify_reads)

    def read(self, name: str, start: int = 0, stop: Optional[int] = None, *, raw: bool = False) -> np.ndarray:
        """Rows [start, stop) of a field or column as a numpy array, read whole (not streamed).

        bfloat16 fields come back as float32 (exact; numpy has no bfloat16), or with ``raw=True`` as the
        uint16 bits stored on disk.
        """
        spec = self._spec(name)
        n = len(self)
        stop = n if stop is None else _check_int("stop", stop)
        start = _check_int("start", start)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"need 0 <= start <= stop <= N = {n}, got start={start}, stop={stop}")
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
        from tqdm.auto import tqdm

        files = [sf for name in self._specs for sf in self._files[name]]
        problems = []
        with tqdm(total=sum(sf.nbytes for sf in files), unit="B", unit_scale=True, desc="verify",
                  disable=not progress) as bar:
            for sf in files:
                try:
                    with open(sf.path, "rb", buffering=0) as f:
                        crc = _crc_span(f, sf.nbytes, 0, sf.path, bar.update)
                        if f.read(1):
                            raise StoreError(f"shard file {sf.path} is longer than the manifest says")
                    if crc != sf.crc32:
                        raise _checksum_error(sf, crc)
                except FileNotFoundError:
                    problems.append(f"shard file {sf.path} is missing")
                except StoreError as exc:
                    problems.append(str(exc))
        if problems:
            raise StoreError(f"{len(problems)} bad shard file(s) in {self.path}:\n" + "\n".join(problems))


# --------------------------------------------------------------------------------------------------
# Writing


def _as_disk_rows(spec: _Spec, value, row_base: int) -> np.ndarray:
    """One batch entry (tensor, array or list) as validated rows in the on-disk dtype."""
    what = f"{'field' if spec.width else 'column'} {spec.name!r}"
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{what} must be a tensor or array, got {type(value).__name__} ({exc})") from None
    if spec.width is not None:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{what} must hold floats, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != spec.width:
            raise ValueError(f"{what} must be [n, {spec.width}], got shape {list(t.shape)}")
        t = t.to(FIELD_DTYPES[spec.dtype])
        bad = ~torch.isfinite(t).all(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{what} row {row_base + row} is NaN or Inf (after conversion to {spec.dtype})")
        if spec.dtype == "bfloat16":
            t = t.view(torch.int16)
    else:
        if t.numel() == 0 and t.dim() == 1:  # an empty list arrives as float64
            t = t.to(torch.int64)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{what} must hold integers, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{what} must be 1-D [n], got shape {list(t.shape)}")
        info = torch.iinfo(COLUMN_DTYPES[spec.dtype])
        if t.numel() and (int(t.min()) < info.min or int(t.max()) > info.max):
            raise ValueError(f"{what} has values outside the {spec.dtype} range [{info.min}, {info.max}]")
        t = t.to(COLUMN_DTYPES[spec.dtype])
    return t.contiguous().numpy().view(DISK_DTYPES[spec.dtype])


class HistoryWriter:
    """Appends rows to a history store, committing a shard each time ``shard_rows`` rows are buffered.

    A shard is written under a temporary name, fsynced, renamed, and only then recorded in the manifest
    (itself written the same way): the manifest rename is the commit point. Rows appended since the last
    commit live in memory (one shard's worth) and are lost if the process dies; :meth:`flush` and
    :meth:`close` commit them. One writer at a time (an exclusive lock on ``writer.lock``).
    Make one with :meth:`create` or :meth:`resume`.
    """

    def __init__(self, root: Path, manifest: dict, specs: dict[str, _Spec], lock_fd: int):
        self.path, self._manifest, self._specs, self._lock_fd = root, manifest, specs, lock_fd
        self.shard_rows = manifest["shard_rows"]
        self._buffers = {s.name: np.empty((self.shard_rows, *s.row_shape), DISK_DTYPES[s.dtype]) for s in specs.values()}
        self._buffered = 0  # rows in the buffers (the open shard)
        self._open_committed = 0  # of which already committed as the manifest's last, partial shard
        self._next_id = 1 + max((s["id"] for s in manifest["shards"]), default=-1)
        self.closed = False

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Union[str, os.PathLike], fields: Mapping, columns: Optional[Mapping] = None, *,
               shard_rows: int = DEFAULT_SHARD_ROWS, attrs: Optional[Mapping] = None) -> "HistoryWriter":
        """A new store at ``path`` (absent or an empty directory).

        ``fields`` {name: (width, "float32"|"float16"|"bfloat16")}, ``columns`` {name: "int32"|"int64"},
        ``attrs`` JSON-serialisable run information kept in the manifest.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"cannot create a history store at {root}: it exists and is not an empty directory")
        specs = _check_specs(fields, columns or {})
        if _check_int("shard_rows", shard_rows) <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        attrs = dict(attrs or {})
        try:
            json.dumps(attrs, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"attrs must be JSON-serialisable ({exc})") from None
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "rows": 0,
            "shard_rows": int(shard_rows),
            "fields": {s.name: {"width": s.width, "dtype": s.dtype} for s in specs.values() if s.width},
            "columns": {s.name: {"dtype": s.dtype} for s in specs.values() if not s.width},
            "attrs": attrs,
            "shards": [],
        }
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(root)
        for name in specs:
            (root / DATA_DIR / name).mkdir(parents=True, exist_ok=True)
        _fsync_dir(root / DATA_DIR)
        _write_manifest(root, manifest)
        return cls(root, manifest, specs, lock_fd)

    @classmethod
    def resume(cls, path: Union[str, os.PathLike]) -> "HistoryWriter":
        """Reopen an existing store to append after its last committed row.

        Leftovers of a writer that died (temporary files, shard files no manifest records) are deleted;
        a partial last shard is read back (checksum verified) and rewritten whole by the next commit.
        """
        root = Path(path)
        _load_manifest(root)  # clear errors before taking the lock
        lock_fd = _lock(root)
        try:
            manifest, specs = _load_manifest(root)  # re-read under the lock
            referenced = {root / f["path"] for shard in manifest["shards"] for f in shard["files"].values()}
            for name in specs:
                folder = root / DATA_DIR / name
                folder.mkdir(parents=True, exist_ok=True)
                for leftover in folder.iterdir():
                    if leftover.is_file() and leftover.name.endswith((".npy", TMP_SUFFIX)) and leftover not in referenced:
                        leftover.unlink()
            store = HistoryStore(root)
            writer = cls(root, manifest, specs, lock_fd)
            last = manifest["shards"][-1]["rows"] if manifest["shards"] else writer.shard_rows
            if last < writer.shard_rows:
                for name, buf in writer._buffers.items():
                    buf[:last] = store.read(name, len(store) - last, raw=True)
                writer._buffered = writer._open_committed = last
        except BaseException:
            os.close(lock_fd)
            raise
        return writer

    # -- state ---------------------------------------------------------------------------------------
    @property
    def committed_rows(self) -> int:
        """Rows a reader sees (and a resume starts after)."""
        return self._manifest["rows"]

    @property
    def rows(self) -> int:
        """Rows appended so far, committed or buffered."""
        return self.committed_rows - self._open_committed + self._buffered

    def __len__(self) -> int:
        return self.rows

    def __enter__(self) -> "HistoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HistoryWriter({str(self.path)!r}, rows={self.rows}, committed={self.committed_rows})"

    # -- writing -------------------------------------------------------------------------------------
    def append(self, batch: Mapping) -> None:
        """Append n rows: ``batch`` maps every field to [n, width] floats and every column to [n] ints.

        The batch is validated whole before any row is buffered (names, shapes, dtypes, finite values,
        column ranges), so a rejected batch leaves the writer unchanged.
        """
        self._check_open()
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict {{name: rows}}, got {type(batch).__name__}")
        missing, unknown = set(self._specs) - set(batch), set(batch) - set(self._specs)
        if missing or unknown:
            raise ValueError(f"batch must give exactly {sorted(self._specs)}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        rows = {name: _as_disk_rows(spec, batch[name], self.rows) for name, spec in self._specs.items()}
        lengths = {name: len(r) for name, r in rows.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"batch entries have different row counts: {lengths}")
        n = next(iter(lengths.values()))
        done = 0
        while done < n:
            take = min(n - done, self.shard_rows - self._buffered)
            for name, r in rows.items():
                self._buffers[name][self._buffered : self._buffered + take] = r[done : done + take]
            self._buffered += take
            done += take
            if self._buffered == self.shard_rows:
                self._commit()

    def flush(self) -> None:
        """Commit the buffered rows now (as a partial shard, rewritten whole when it fills up)."""
        self._check_open()
        if self._buffered > self._open_committed:
            self._commit()

    def close(self) -> None:
        """Commit the buffered rows and release the store. Idempotent."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            os.close(self._lock_fd)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"HistoryWriter for {self.path} is closed")

    def _commit(self) -> None:
        """Write the buffered rows as a new shard and commit it in the manifest (replacing the partial last
        shard they extend, whose files are deleted only after the commit)."""
        rows, sid = self._buffered, self._next_id
        files = {}
        for name, buf in self._buffers.items():
            rel = f"{DATA_DIR}/{name}/{sid:08d}.npy"
            data = buf[:rows]
            nbytes, crc = _write_atomic(self.path / rel, [_npy_header(data.dtype, data.shape), data])
            files[name] = {"path": rel, "bytes": nbytes, "crc32": crc}
        for name in self._buffers:
            _fsync_dir(self.path / DATA_DIR / name)
        shards = list(self._manifest["shards"])
        replaced = shards.pop() if self._open_committed else None
        shards.append({"id": sid, "rows": rows, "files": files})
        manifest = {**self._manifest, "rows": sum(s["rows"] for s in shards), "shards": shards}
        _write_manifest(self.path, manifest)
        self._manifest, self._next_id = manifest, sid + 1
        if replaced is not None:
            for entry in replaced["files"].values():
                (self.path / entry["path"]).unlink(missing_ok=True)
        if rows == self.shard_rows:
            self._buffered = self._open_committed = 0
        else:
            self._open_committed = rows


def _lock(root: Path) -> int:
    """An exclusive lock on the store's writer.lock (released by the kernel if the writer dies)."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"another HistoryWriter has {root} open ({root / LOCK_FILE} is locked)") from None
    return fd
