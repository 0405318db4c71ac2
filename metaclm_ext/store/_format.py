"""The on-disk format of a history store (docs/history-store.md): names, dtypes, manifest, shard files.

Everything here is about bytes on disk and says nothing of streaming: the constants of the layout, the
field specs, ``.npy`` headers, CRC-32 over file spans, atomic writes (a fsynced temporary file renamed
into place, then the directory fsynced) and the manifest, loaded with every structural check and written
atomically as the writer's commit point.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np
import torch

from ..dtypes import HISTORY_DTYPE_NAMES

FORMAT = "metaclm-history-store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"
DATA_DIR = "data"
TMP_SUFFIX = ".tmp"
DEFAULT_SHARD_ROWS = 65536
DEFAULT_READAHEAD = 2

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
BUFFER_DTYPES = {**HISTORY_DTYPE_NAMES, **COLUMN_DTYPES, "bfloat16": torch.int16}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_PIECE = 8 << 20  # bytes per read when a span is read for its checksum only


class StoreError(ValueError):
    """A store on disk is malformed, corrupted or disagrees with its manifest (the message names the file)."""


class Spec(NamedTuple):
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


class ShardFile(NamedTuple):
    path: Path
    nbytes: int
    crc32: int
    offset: int  # bytes before the first row (the .npy header)


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, npy headers, checksums


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, parts: list) -> tuple[int, int]:
    """Write `parts` (bytes-like) to `path` via a fsynced temporary file and a rename: (bytes, crc32).

    A failed write (ENOSPC, EIO) removes its temporary file, so it neither holds the space nor replaces `path`.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    crc, nbytes = 0, 0
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                if memoryview(part).nbytes == 0:
                    continue  # an empty array has no byte view
                view = memoryview(part).cast("B")
                f.write(view)
                crc = zlib.crc32(view, crc)
                nbytes += view.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return nbytes, crc


def open_regular(path: Path, what: str):
    """`path` opened for binary reading, or StoreError unless it is a regular file inside no symlink.

    Opened non-blocking and checked with fstat before any read: a FIFO or a device in place of a store
    file would otherwise block the reader forever. A symlink is refused because it can point outside
    the store.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StoreError(f"{what} {path} is missing") from None
    except OSError as exc:
        detail = "is a symlink" if os.path.islink(path) else f"cannot be opened ({exc.strerror})"
        raise StoreError(f"{what} {path} {detail}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StoreError(f"{what} {path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _read_npy_header(path: Path) -> tuple[tuple, bool, np.dtype, int, int]:
    """(shape, fortran_order, dtype, data offset, file size) of a .npy file, or StoreError naming it.

    The size comes from the open file (fstat), so a writer replacing the file meanwhile cannot make it fail.
    """
    with open_regular(path, "shard file") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read[version](f)
            return shape, fortran, dtype, f.tell(), os.fstat(f.fileno()).st_size
        except Exception as exc:  # numpy parses the header with Python's tokenizer: TokenError, SyntaxError, ...
            raise StoreError(f"shard file {path} has no valid .npy header ({type(exc).__name__}: {exc})") from None


def crc_span(f, nbytes: int, crc: int, path: Path, on_bytes: Optional[Callable[[int], None]] = None) -> int:
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


def checksum_error(sf: ShardFile, crc: int) -> StoreError:
    return StoreError(f"shard file {sf.path} is corrupted: CRC-32 {crc:#010x}, the manifest says {sf.crc32:#010x}")


# --------------------------------------------------------------------------------------------------
# Manifest


def check_specs(fields: Mapping, columns: Mapping) -> dict[str, Spec]:
    """Validated specs of create()'s `fields` {name: (width, dtype)} and `columns` {name: dtype}."""
    if not isinstance(fields, Mapping) or not isinstance(columns, Mapping):
        raise TypeError("fields must be a dict {name: (width, dtype)} and columns a dict {name: dtype}")
    specs: dict[str, Spec] = {}
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
                if dtype not in HISTORY_DTYPE_NAMES:
                    raise ValueError(f"field {name!r} dtype must be one of {sorted(HISTORY_DTYPE_NAMES)}, got {dtype!r}")
            else:
                width, dtype = None, value
                if dtype not in COLUMN_DTYPES:
                    raise ValueError(
                        f"column {name!r} dtype must be int32 or int64, got {dtype!r} (no narrower ints: "
                        "token ids and steps overflow them)"
                    )
            specs[name] = Spec(name, dtype, width)
    if not specs:
        raise ValueError("a store needs at least one field or column")
    return specs


def _manifest_specs(manifest: dict) -> dict[str, Spec]:
    fields = {n: (f.get("width"), f.get("dtype")) for n, f in manifest["fields"].items()}
    columns = {n: c.get("dtype") for n, c in manifest["columns"].items()}
    return check_specs(fields, columns)


def load_manifest(root: Path) -> tuple[dict, dict[str, Spec]]:
    """The parsed, structurally checked manifest of the store at `root` and its specs."""
    if not root.exists():
        raise FileNotFoundError(f"history store {root} does not exist")
    if not root.is_dir():
        raise StoreError(f"history store {root} is not a directory")
    path = root / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise StoreError(f"{root} is not a history store: {path} is missing")
    with open_regular(path, "manifest") as f:
        text = f.read()
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise StoreError(f"manifest {path} is not valid JSON ({type(exc).__name__}: {exc})") from None
    try:
        if not isinstance(manifest, dict):
            raise TypeError(f"the top level must be an object, got {type(manifest).__name__}")
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
            if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows <= shard_rows:
                raise ValueError(f"shard {i} has {rows!r} rows (must be in [1, shard_rows = {shard_rows}])")
            if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0 or sid in ids:
                raise ValueError(f"shard {i} has a bad or repeated id {sid!r}")
            ids.add(sid)
            if set(shard["files"]) != set(specs):
                raise ValueError(f"shard {i} has files for {sorted(shard['files'])}, expected {sorted(specs)}")
            for name, entry in shard["files"].items():
                if not isinstance(entry["path"], str):
                    raise TypeError(f"shard {i} file path {entry['path']!r} must be a string")
                rel = Path(entry["path"])
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise ValueError(f"shard {i} file path {entry['path']!r} leaves the store")
                if not all(isinstance(entry[key], int) and not isinstance(entry[key], bool) for key in ("bytes", "crc32")):
                    raise ValueError(f"shard {i} file {entry['path']!r} needs int bytes and crc32")
            total += rows
        if manifest["rows"] != total:
            raise ValueError(f"rows is {manifest['rows']!r} but the shards hold {total}")
        if not isinstance(manifest.get("attrs", {}), dict):
            raise ValueError("attrs must be an object")
    except StoreError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise StoreError(f"manifest {path} is malformed: {detail}") from None
    return manifest, specs


def write_manifest(root: Path, manifest: dict) -> None:
    """The commit point: rows become visible when this rename lands."""
    write_atomic(root / MANIFEST, [json.dumps(manifest, indent=1).encode()])
    fsync_dir(root)


def check_inside(root: Path, path: Path, what: str) -> None:
    """StoreError unless `path`, with every symlink resolved, lies inside the store at `root`.

    The manifest's relative paths are checked when it loads; this catches a symlinked folder on the way.
    """
    if not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{what} {path} leaves the store {root} (through a symlink)")


def open_shard_files(root: Path, manifest: dict, specs: dict[str, Spec]) -> dict[str, list[ShardFile]]:
    """Per name, the shard files in row order, each checked against the manifest (exists, size, header)."""
    files: dict[str, list[ShardFile]] = {name: [] for name in specs}
    folders_inside = set()  # each folder resolved once; the file itself is opened with O_NOFOLLOW
    for shard in manifest["shards"]:
        for name, spec in specs.items():
            entry = shard["files"][name]
            path = root / entry["path"]
            if path.parent not in folders_inside:
                check_inside(root, path.parent, "shard folder")
                folders_inside.add(path.parent)
            shape, fortran, dtype, offset, size = _read_npy_header(path)
            want_shape = (shard["rows"], *spec.row_shape)
            if fortran or dtype != DISK_DTYPES[spec.dtype] or tuple(shape) != want_shape:
                raise StoreError(
                    f"shard file {path} holds {dtype} {list(shape)}{' (Fortran order)' if fortran else ''} but "
                    f"the manifest says {spec.name} is {spec.dtype} {list(want_shape)} (stored as {DISK_DTYPES[spec.dtype]})"
                )
            expected = offset + shard["rows"] * spec.row_bytes
            if size != entry["bytes"] or size != expected:
                raise StoreError(
                    f"shard file {path} is {size} bytes; its header implies {expected} and the manifest says "
                    f"{entry['bytes']} (truncated or overwritten)"
                )
            files[name].append(ShardFile(path, size, entry["crc32"], offset))
    return files




def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)
