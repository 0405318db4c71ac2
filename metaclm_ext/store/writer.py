"""Writing a history store: :class:`HistoryWriter` appends rows and commits them shard by shard, one
writer at a time under an exclusive lock; a writer killed at any moment leaves a store that opens with
every committed row and can be resumed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch

from ..dtypes import HISTORY_DTYPE_NAMES
from ..locks import try_lock
from ._format import (COLUMN_DTYPES, DATA_DIR, DEFAULT_SHARD_ROWS, DISK_DTYPES, FORMAT, LOCK_FILE, TMP_SUFFIX,
                      VERSION, Spec, StoreError, check_inside, check_int, check_specs, fsync_dir, load_manifest,
                      npy_header, write_atomic, write_manifest)
from .reader import HistoryStore

__all__ = ["HistoryWriter"]


def _as_disk_rows(spec: Spec, value, row_base: int) -> np.ndarray:
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
        t = t.to(HISTORY_DTYPE_NAMES[spec.dtype])
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

    def __init__(self, root: Path, manifest: dict, specs: dict[str, Spec], lock_fd: int):
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
        _check_empty(root)  # before the lock file is made: a folder that is not ours stays untouched
        specs = check_specs(fields, columns or {})
        if check_int("shard_rows", shard_rows) <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        attrs = _checked_attrs(dict(attrs or {}))
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
        try:
            _check_empty(root)  # again under the lock: another creator may have committed rows meanwhile
            for name in specs:
                (root / DATA_DIR / name).mkdir(parents=True, exist_ok=True)
            fsync_dir(root / DATA_DIR)
            write_manifest(root, manifest)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(root, manifest, specs, lock_fd)

    @classmethod
    def resume(cls, path: Union[str, os.PathLike]) -> "HistoryWriter":
        """Reopen an existing store to append after its last committed row.

        Leftovers of a writer that died (temporary files, shard files no manifest records) are deleted;
        a partial last shard is read back (checksum verified) and rewritten whole by the next commit.
        """
        root = Path(path)
        load_manifest(root)  # clear errors before taking the lock
        lock_fd = _lock(root)
        try:
            manifest, specs = load_manifest(root)  # re-read under the lock
            referenced = {root / f["path"] for shard in manifest["shards"] for f in shard["files"].values()}
            check_inside(root, root / DATA_DIR, "data folder")
            for name in specs:
                folder = root / DATA_DIR / name
                check_inside(root, folder, "data folder")  # leftovers are deleted: never outside the store
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
        room = self.shard_rows - self._buffered
        if n < room:
            for name, r in rows.items():
                self._buffers[name][self._buffered : self._buffered + n] = r
            self._buffered += n
            return
        # The batch fills the open shard and maybe more: the full shards are written straight from the batch
        # and committed in one manifest write, and the buffers change only after that commit, so an append
        # that fails (ENOSPC, EIO) leaves the writer as it was and can be retried.
        full_rows = room + (n - room) // self.shard_rows * self.shard_rows
        shards = [{name: [self._buffers[name][: self._buffered], r[:room]] for name, r in rows.items()}]
        shards += [{name: [r[start : start + self.shard_rows]] for name, r in rows.items()}
                   for start in range(room, full_rows, self.shard_rows)]
        self._commit([(self.shard_rows, parts) for parts in shards])
        for name, r in rows.items():
            self._buffers[name][: n - full_rows] = r[full_rows:]
        self._buffered, self._open_committed = n - full_rows, 0

    def update_attrs(self, attrs: Mapping) -> None:
        """Set the keys of ``attrs`` (JSON-serialisable) in the store's attrs and commit them now, with the
        rows committed so far (buffered rows stay buffered)."""
        self._check_open()
        if not isinstance(attrs, Mapping):
            raise TypeError(f"attrs must be a dict, got {type(attrs).__name__}")
        manifest = {**self._manifest, "attrs": _checked_attrs({**self._manifest.get("attrs", {}), **attrs})}
        write_manifest(self.path, manifest)
        self._manifest = manifest

    def flush(self) -> None:
        """Commit the buffered rows now (as a partial shard, rewritten whole when it fills up)."""
        self._check_open()
        if self._buffered > self._open_committed:
            rows = self._buffered
            self._commit([(rows, {name: [buf[:rows]] for name, buf in self._buffers.items()})])
            self._open_committed = rows

    def close(self) -> None:
        """Commit the buffered rows and release the store. Idempotent."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            os.close(self._lock_fd)

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows and drop the rest (e.g. the rows recorded after the checkpoint that a
        resumed training run restarts from). One manifest write commits the change: a crash before it keeps
        every row, a crash after it only the first ``rows``; dropped shards' files are deleted afterwards."""
        self._check_open()
        if check_int("rows", rows) < 0 or rows > self.rows:
            raise ValueError(f"rows must be in [0, {self.rows}], got {rows}")
        self.flush()
        if rows == self.committed_rows:
            return
        kept, start = [], 0
        shards = self._manifest["shards"]
        while start + shards[len(kept)]["rows"] <= rows:
            start += shards[len(kept)]["rows"]
            kept.append(shards[len(kept)])
        dropped = shards[len(kept):]
        cut = rows - start  # rows kept of the first dropped shard, rewritten as a new partial shard
        if cut:
            store = HistoryStore(self.path)
            kept_rows = {name: store.read(name, start, rows, raw=True) for name in self._buffers}
            before = self._manifest, self._open_committed
            self._manifest = {**self._manifest, "shards": kept + [dropped[0]]}
            self._open_committed = cut  # so that the commit replaces dropped[0], in one manifest write
            try:
                self._commit([(cut, {name: [r] for name, r in kept_rows.items()})])
            except BaseException:
                self._manifest, self._open_committed = before  # nothing changed on disk: as before the call
                raise
            for name, r in kept_rows.items():
                self._buffers[name][:cut] = r
            self._buffered = cut
            dropped = dropped[1:]
        else:
            manifest = {**self._manifest, "rows": rows, "shards": kept}
            write_manifest(self.path, manifest)
            self._manifest, self._buffered, self._open_committed = manifest, 0, 0
        for shard in dropped:
            for entry in shard["files"].values():
                (self.path / entry["path"]).unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"HistoryWriter for {self.path} is closed")

    def _commit(self, shards: list[tuple[int, dict]]) -> None:
        """Write `shards` ([(rows, {name: [row arrays]})], the first one starting with the open shard's
        buffered rows) as new shard files and commit them in one manifest write, replacing the partial last
        shard they extend, whose files are deleted only after the commit.

        Nothing in the writer changes unless the commit lands; the files of a failed commit are
        unreferenced (the next commit overwrites them, resume deletes them).
        """
        sid = self._next_id
        entries = []
        for rows, parts in shards:
            files = {}
            for name, arrays in parts.items():
                spec = self._specs[name]
                rel = f"{DATA_DIR}/{name}/{sid:08d}.npy"
                header = npy_header(DISK_DTYPES[spec.dtype], (rows, *spec.row_shape))
                nbytes, crc = write_atomic(self.path / rel, [header, *arrays])
                files[name] = {"path": rel, "bytes": nbytes, "crc32": crc}
            entries.append({"id": sid, "rows": rows, "files": files})
            sid += 1
        for name in self._specs:
            fsync_dir(self.path / DATA_DIR / name)
        committed = list(self._manifest["shards"])
        replaced = committed.pop() if self._open_committed else None
        committed += entries
        manifest = {**self._manifest, "rows": sum(s["rows"] for s in committed), "shards": committed}
        write_manifest(self.path, manifest)
        self._manifest, self._next_id = manifest, sid
        if replaced is not None:
            for entry in replaced["files"].values():
                (self.path / entry["path"]).unlink(missing_ok=True)


def _checked_attrs(attrs: dict) -> dict:
    try:
        json.dumps(attrs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"attrs must be JSON-serialisable ({exc})") from None
    return attrs


def _check_empty(root: Path) -> None:
    """FileExistsError unless `root` is absent or an empty folder (a lock file left by a failed create aside)."""
    if root.exists() and (not root.is_dir() or any(p.name != LOCK_FILE for p in root.iterdir())):
        raise FileExistsError(f"cannot create a history store at {root}: it exists and is not an empty directory")


def _lock(root: Path) -> int:
    """An exclusive lock on the store's writer.lock (released by the kernel if the writer dies)."""
    fd = try_lock(root / LOCK_FILE)
    if fd is None:
        raise StoreError(f"another HistoryWriter has {root} open ({root / LOCK_FILE} is locked)")
    return fd
