"""Fuzzing the two inputs a user hands the package: history stores on disk and the ops' arguments.

(a) A valid small store with its manifest mutated (random JSON edits: values of another type, keys
    deleted or added, values nested, text truncated or garbled) and its shard files damaged at random
    (header or data bytes, truncation, extra bytes): every outcome is a correct read (equal to the
    original rows) or a StoreError, never another exception, a crash or a hang.
(b) The ops on random shapes (0 rows and 0 queries included), dtypes (int, bool, complex, float64 among
    them), k and limit values: every outcome equals metaclm_ext.reference or is a ValueError/TypeError.

CI runs a few examples per property (the whole file in well under a minute on a busy 2-core machine);
``METACLM_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` runs a long campaign by hand (docs/security.md
records the last one). Zero-width histories and queries (D = 0) are left out of (b) until the kernels
stop dividing by the width.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaclm_ext
from metaclm_ext import HistoryStore, HistoryWriter, StoreError
from metaclm_ext import reference as ref
from helpers import assert_selection_equal, run_with_timeout

EXAMPLES = int(os.environ.get("METACLM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
READ_TIMEOUT_S = 20

# --------------------------------------------------------------------------------------------------
# (a) the store format

FIELDS = {"x": (3, "float32"), "h": (2, "float16"), "b": (2, "bfloat16")}
COLUMNS = {"step": "int64", "seed": "int32"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store of 10 rows in shards of 4, 4 and 2 rows, and its rows as stored (raw bits)."""
    root = tmp_path_factory.mktemp("fuzz")
    gen = torch.Generator().manual_seed(7)
    with HistoryWriter.create(root / "store", FIELDS, COLUMNS, shard_rows=4, attrs={"run": "fuzz"}) as w:
        for n in (3, 5, 2):
            batch = {name: torch.randn(n, width, generator=gen) for name, (width, _) in FIELDS.items()}
            batch["step"] = np.arange(w.rows, w.rows + n)
            batch["seed"] = np.arange(n, dtype=np.int32) - 7
            w.append(batch)
    store = HistoryStore(root / "store")
    rows = {name: store.read(name, raw=True) for name in (*FIELDS, *COLUMNS)}
    return root, rows


def _read_all(path: Path) -> dict:
    """Every row of every name, read in full and streamed, plus a whole-store checksum pass."""
    store = HistoryStore(path)
    out = {name: store.read(name, raw=True) for name in (*FIELDS, *COLUMNS)}
    for name in (*FIELDS, *COLUMNS):
        for _ in store[name].iter_chunks(3):
            pass
    store.verify()
    return out


def _assert_read_or_store_error(path: Path, want: dict) -> None:
    box = run_with_timeout(lambda: _read_all(path), READ_TIMEOUT_S)
    if "error" in box:
        if not isinstance(box["error"], StoreError):
            raise AssertionError(f"{type(box['error']).__name__} instead of StoreError: {box['error']}") from box["error"]
        return
    assert set(box["result"]) == set(want)
    for name, rows in want.items():
        np.testing.assert_array_equal(box["result"][name], rows, err_msg=f"{name}: a wrong read without an error")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["float32", "bfloat16", "int64", "data/x/00000000.npy", "..", "/etc/passwd", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _positions(node, path=()):
    """Every (container path, key) of a parsed JSON document, the root's children first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path, key
        yield from _positions(child, (*path, key))


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def json_edits(draw, manifest: dict):
    """A mutated copy of `manifest`, as text."""
    doc = json.loads(json.dumps(manifest))
    for _ in range(draw(st.integers(1, 3))):
        positions = list(_positions(doc))
        if not positions:
            break
        path, key = positions[draw(st.integers(0, len(positions) - 1))]
        parent = _at(doc, path)
        action = draw(st.sampled_from(["replace", "delete", "nest", "add", "number"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif action == "nest":
            parent[key] = draw(st.sampled_from([lambda v: [v], lambda v: {"value": v}]))(parent[key])
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        elif action == "number" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] = parent[key] + draw(st.sampled_from([-1, 1, 2**31, -(2**63), 2**64]))
    text = json.dumps(doc, indent=draw(st.sampled_from([None, 1])))
    garble = draw(st.sampled_from(["none", "none", "truncate", "byte", "deep"]))
    if garble == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif garble == "byte":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(min_size=1, max_size=3)) + text[at:]
    elif garble == "deep":
        depth = draw(st.sampled_from([50, 5000, 200000]))
        text = "[" * depth + text + "]" * depth
    return text


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_mutations_read_correctly_or_raise_store_error(pristine, data):
    root, want = pristine
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    text = data.draw(json_edits(manifest))
    with tempfile.TemporaryDirectory(dir=root) as work:
        store = Path(work) / "store"
        shutil.copytree(root / "store", store)
        (store / "manifest.json").write_text(text, errors="surrogatepass")
        _assert_read_or_store_error(store, want)


@FUZZ
@given(data=st.data())
def test_fuzz_shard_damage_reads_correctly_or_raises_store_error(pristine, data):
    root, want = pristine
    with tempfile.TemporaryDirectory(dir=root) as work:
        store = Path(work) / "store"
        shutil.copytree(root / "store", store)
        shards = sorted(store.glob("data/*/*.npy"))
        for _ in range(data.draw(st.integers(1, 3))):
            shard = shards[data.draw(st.integers(0, len(shards) - 1))]
            raw = bytearray(shard.read_bytes())
            action = data.draw(st.sampled_from(["header", "data", "truncate", "extend", "replace_header"]))
            if not raw:
                action = "extend"
            if action == "header":  # the magic, version, header length and the header dict
                at = data.draw(st.integers(0, min(len(raw), 128) - 1))
                raw[at] = data.draw(st.integers(0, 255))
            elif action == "data" and len(raw) > 128:
                at = data.draw(st.integers(128, len(raw) - 1))
                raw[at] ^= data.draw(st.integers(1, 255))
            elif action == "truncate":
                raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
            elif action == "extend":
                raw += data.draw(st.binary(min_size=1, max_size=64))
            elif action == "replace_header":
                header = data.draw(st.sampled_from([
                    "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 3), }",
                    "{'descr': '|O', 'fortran_order': False, 'shape': (4, 3), }",
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 3), }",
                    "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4,), }",
                    "__import__('os').system('false')",
                    "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 500 + ")" * 500 + ", }",
                ]))
                body = header.encode().ljust(118, b" ")[:117] + b"\n"
                raw = bytearray(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body) + raw[128:]
            shard.write_bytes(bytes(raw))
        _assert_read_or_store_error(store, want)


# --------------------------------------------------------------------------------------------------
# (b) the ops' shapes and dtypes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
          torch.complex64]


def _tensor(shape, dtype, gen):
    """Integer-valued entries in [-3, 3] (exact sums in every float dtype), in `dtype`."""
    values = torch.randint(-3, 4, shape, generator=gen)
    if dtype.is_complex:
        return values.to(torch.float32).to(dtype)
    return values.to(dtype)


@st.composite
def op_arguments(draw):
    """(queries, history, heads, limit, k) where the shapes agree more often than not."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n = draw(st.integers(0, 12))
    q = draw(st.integers(0, 4))
    h = draw(st.integers(1, 3))
    dh = draw(st.integers(0, 4))
    width = h * dh if draw(st.booleans()) else draw(st.integers(0, 9))
    layout = draw(st.sampled_from(["heads", "flat", "flat-with-heads"]))
    qdtype = draw(st.sampled_from(DTYPES[:3])) if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    hdtype = draw(st.sampled_from(DTYPES[:3])) if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    queries = _tensor((q, h, dh) if layout == "heads" else (q, h * dh), qdtype, gen)
    history = _tensor((n, width), hdtype, gen)
    heads = h if layout == "flat-with-heads" else None
    limit = draw(st.one_of(st.none(), st.integers(-1, n + 1),
                           st.lists(st.integers(-1, n + 1), min_size=q, max_size=q).map(torch.tensor),
                           st.lists(st.integers(0, n), min_size=max(q - 1, 0), max_size=q + 1).map(torch.tensor)))
    if draw(st.integers(0, 9)) == 0 and history.numel() and history.dtype.is_floating_point:
        history.view(-1)[draw(st.integers(0, history.numel() - 1))] = float("nan")
    k = draw(st.integers(-1, n + 2))
    return queries, history, heads, limit, k


def _limit_for_reference(limit):
    return limit.clone() if isinstance(limit, torch.Tensor) else limit


def _stop(limit, n: int) -> int:
    """Rows at or after the largest limit are never read by the ops: their values are not checked."""
    return n if limit is None else int(torch.as_tensor(limit).max())


def _as_read(rows: torch.Tensor, limit) -> torch.Tensor:
    """`rows` with the rows the op never reads zeroed (a NaN there is no error, and it adds nothing)."""
    rows = rows.clone()
    rows[_stop(limit, rows.shape[0]):] = 0
    return rows


@FUZZ
@given(args=op_arguments())
def test_fuzz_history_topk_equals_the_reference_or_raises(args):
    queries, history, heads, limit, k = args
    try:
        got = metaclm_ext.history_topk(queries, history, k, limit=limit, heads=heads)
    except (ValueError, TypeError):
        return
    want = ref.history_topk_reference(queries, history, k, limit=_limit_for_reference(limit), heads=heads)
    assert_selection_equal(got.top, want.top)
    assert_selection_equal(got.last, want.last)


@FUZZ
@given(args=op_arguments(), num_labels=st.integers(-1, 5), label_dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99))
def test_fuzz_history_label_mass_equals_the_reference_or_raises(args, num_labels, label_dtype, seed):
    queries, history, heads, limit, _ = args
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, max(num_labels, 1) + 1, (history.shape[0],), generator=gen).to(label_dtype)
    try:
        got = metaclm_ext.history_label_mass(queries, history, labels, num_labels, limit=limit, heads=heads)
    except (ValueError, TypeError):
        return
    want = ref.history_label_mass_reference(queries, _as_read(history, limit), _as_read(labels, limit), num_labels,
                                            limit=_limit_for_reference(limit), heads=heads)
    torch.testing.assert_close(got, want.to(torch.float32), rtol=0, atol=0)


@FUZZ
@given(args=op_arguments(), d_out=st.integers(1, 4), edtype=st.sampled_from(DTYPES), rows_differ=st.booleans())
def test_fuzz_dual_form_apply_equals_the_reference_or_raises(args, d_out, edtype, rows_differ):
    queries, inputs, _, limit, _ = args
    errors = _tensor((inputs.shape[0] + int(rows_differ), d_out), edtype, torch.Generator().manual_seed(d_out))
    try:
        got = metaclm_ext.dual_form_apply(queries, inputs, errors, limit=limit)
    except (ValueError, TypeError):
        return
    want = ref.dual_form_apply_reference(queries, _as_read(inputs, limit), _as_read(errors, limit),
                                         limit=_limit_for_reference(limit))
    torch.testing.assert_close(got, want.to(torch.float32), rtol=0, atol=0)
