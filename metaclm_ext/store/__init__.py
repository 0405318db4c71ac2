"""The training history on disk: a directory of ``.npy`` shards under a JSON manifest, streamed to the ops.

A training run records millions of rows (one per trained token per step: layer inputs and their error
signals, plus integer metadata such as step, seed, next token). :class:`HistoryWriter` appends them in
shards that become visible only once fully written, fsynced and recorded in the manifest (the manifest
rename is the commit point), so a writer killed at any moment leaves a store that opens with every
committed row and can be resumed. :class:`HistoryStore` opens a store read-only, checks the manifest
against the shard files, and hands out :class:`StoreField` row sources that ``history_topk``,
``history_label_mass`` and ``dual_form_apply`` stream in chunks read ahead on a background thread,
verifying each shard's CRC-32 as it goes.

The package mirrors the docs: ``_format`` is the on-disk format of docs/history-store.md (manifest,
dtypes, ``.npy`` headers, checksums, atomic writes), ``reader`` and ``writer`` the two sides of
docs/store.md.
"""
from ._format import DEFAULT_SHARD_ROWS, MANIFEST, StoreError
from .reader import HistoryStore, StoreField, StoreRows
from .writer import HistoryWriter

__all__ = ["DEFAULT_SHARD_ROWS", "MANIFEST", "HistoryStore", "HistoryWriter", "StoreError", "StoreField", "StoreRows"]
