"""Recorded error fields keep their precision in float16: each is stored times a power-of-two scale.

A small learning rate makes every error signal e_t of the tiny model below subnormal in float16 (as on a
real LM, docs/recording.md), so storing e_t as it is loses 2-20 % of each value, while the scaled store
rebuilds the float32 store's dual form to float16's relative rounding.
"""
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from metaclm_ext import HistoryStore, dual_form_apply
from metaclm_ext.commands.store_info import describe
from metaclm_ext.recording import HistoryRecorder, dualcheck_store
from metaclm_ext.store import HistoryWriter, StoreError
from metaclm_ext.store.scales import SCALES, field_scale, true_units

LR = 1e-5  # e_t ~ 1e-8 .. 1e-6: below float16's smallest normal value, 2^-14 = 6.1e-5
FLOAT16_TINY = float(torch.finfo(torch.float16).tiny)
CLASSES, WIDTH, POSITIONS = 4, 8, 12
MODULES = ["net.0", "net.2"]


class TwoLayer(nn.Module):
    """float64 weights, so the saved weight change is exact and the dual form's error is the history's."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(WIDTH, 16), nn.Tanh(), nn.Linear(16, CLASSES)).double()

    def forward(self, inputs, targets):
        return nn.functional.cross_entropy(self.net(inputs).reshape(-1, CLASSES), targets.reshape(-1))


def record(path, dtype, lrs, model=None, resume=False):
    """Train ``model`` (default: a fresh seeded one) one plain-SGD step per learning rate in ``lrs``,
    recording into ``path``; returns the model."""
    if model is None:
        torch.manual_seed(0)
        model = TwoLayer()
    recorder = HistoryRecorder(model, path, MODULES, dtype=dtype, resume=resume,
                               targets_from=lambda args, kwargs: kwargs["targets"])
    gen = torch.Generator().manual_seed(len(lrs) + recorder.next_step)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    try:
        for lr in lrs:
            opt.param_groups[0]["lr"] = lr
            inputs = torch.randn(1, POSITIONS, WIDTH, generator=gen, dtype=torch.float64)
            targets = torch.randint(0, CLASSES, (1, POSITIONS), generator=gen)
            model(inputs=inputs, targets=targets).backward()
            recorder.step(opt)
            opt.step()
            opt.zero_grad()
    finally:
        recorder.close()
    return model


def dual_forms(path, queries):
    """{error field: the dual form of the store's history for ``queries`` [Q, 16] (their first in_features
    entries), in true units (fp64)}."""
    store = HistoryStore(path)
    out = {}
    for module in store.attrs["recording"]["modules"]:
        q = queries[:, : module["in_features"]].float()
        raw = dual_form_apply(q, store[module["input_field"]], store[module["error_field"]]).double()
        out[module["error_field"]] = true_units(store.attrs, module["error_field"], raw)
    return out


def worst_relative_difference(path, reference):
    queries = torch.randn(4, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours, theirs = dual_forms(path, queries), dual_forms(reference, queries)
    return max(float((ours[f] - theirs[f]).norm() / theirs[f].norm()) for f in theirs)


def write_unscaled_copy(source, target, dtype="float16"):
    """``source``'s recording as the recorder wrote it before error fields had scales: every field cast
    to ``dtype`` as it is, and no scales in the attrs."""
    store = HistoryStore(source)
    attrs = {k: v for k, v in store.attrs.items() if k != SCALES}
    fields = {name: (width, dtype) for name, (width, _) in store.fields.items()}
    with HistoryWriter.create(target, fields, store.columns, attrs=attrs) as writer:
        writer.append({name: store.read_tensor(name) for name in store.fields}
                      | {name: store.read(name) for name in store.columns})
    for extra in source.iterdir():
        if extra.is_file() and not (target / extra.name).exists():
            shutil.copy(extra, target / extra.name)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One training recorded twice: float32 and float16 histories, three steps (the scale is chosen at
    the first), and the float16 history written unscaled."""
    root = tmp_path_factory.mktemp("scales")
    lrs = [LR, LR / 2, LR * 3]
    record(root / "fp32", "float32", lrs)
    record(root / "fp16", "float16", lrs)
    write_unscaled_copy(root / "fp32", root / "fp16-unscaled")
    return root


def test_float16_errors_are_subnormal_without_a_scale(recorded):
    store = HistoryStore(recorded / "fp32")
    errors = np.abs(np.concatenate([store.read(f).ravel() for f in store.fields if f.endswith(".err")]))
    assert np.mean(errors < FLOAT16_TINY) > 0.99  # the setting the scale is for
    assert store.attrs[SCALES] == {"net.0.err": 1.0, "net.2.err": 1.0}  # float32 needs none


def test_scaled_float16_dual_form_matches_float32(recorded):
    scales = HistoryStore(recorded / "fp16").attrs[SCALES]
    assert set(scales) == {"net.0.err", "net.2.err"} and min(scales.values()) >= 2**16
    scaled = worst_relative_difference(recorded / "fp16", recorded / "fp32")
    unscaled = worst_relative_difference(recorded / "fp16-unscaled", recorded / "fp32")
    assert scaled < 2e-3  # float16's relative rounding of x_t and e_t
    assert unscaled > 10 * scaled and unscaled > 2e-2


def test_dualcheck_store_reads_errors_in_true_units(recorded):
    fp32, fp16 = dualcheck_store(recorded / "fp32"), dualcheck_store(recorded / "fp16")
    assert fp32["passed"] is True and fp32["max_relative_error"] < 1e-5
    assert fp16["passed"] is None and fp16["max_relative_error"] < 2e-3
    # A store from before scales reads at scale 1: its subnormal errors are off by their rounding.
    old = dualcheck_store(recorded / "fp16-unscaled")
    assert 2e-2 < old["max_relative_error"] < 1


def test_store_info_shows_the_scales(recorded):
    scale = HistoryStore(recorded / "fp16").attrs[SCALES]["net.2.err"]
    lines = describe(HistoryStore(recorded / "fp16"))
    assert f"scale      net.2.err: 2^{int(np.log2(scale))} (stored = true value x scale)" in lines
    assert not any(line.startswith("scale") for line in describe(HistoryStore(recorded / "fp16-unscaled")))


def test_scale_survives_resume(tmp_path, recorded):
    model = record(tmp_path / "h", "float16", [LR])
    first = HistoryStore(tmp_path / "h").attrs[SCALES]
    record(tmp_path / "h", "float16", [LR * 8, LR / 8], model=model, resume=True)
    store = HistoryStore(tmp_path / "h")
    assert store.attrs[SCALES] == first and set(store.read("step")) == {0, 1, 2}
    twin = record(tmp_path / "fp32", "float32", [LR])
    record(tmp_path / "fp32", "float32", [LR * 8, LR / 8], model=twin, resume=True)
    assert worst_relative_difference(tmp_path / "h", tmp_path / "fp32") < 2e-3


def test_scale_is_chosen_at_the_first_nonzero_step(tmp_path):
    record(tmp_path / "h", "float16", [0.0, LR])  # lr 0: every e_t of step 0 is 0, exact at any scale
    record(tmp_path / "fp32", "float32", [0.0, LR])
    assert min(HistoryStore(tmp_path / "h").attrs[SCALES].values()) >= 2**16
    assert worst_relative_difference(tmp_path / "h", tmp_path / "fp32") < 2e-3


def test_a_decay_far_below_the_scale_is_recorded_and_stays_exact(tmp_path):
    """The tail of a decay to 0: a step 2^22 below the first is under float16's normal range even scaled; its
    absolute rounding (2^-24 / scale) is negligible next to the first step's values, so the dual form holds."""
    record(tmp_path / "h", "float16", [LR, LR * 2.0**-22])
    record(tmp_path / "fp32", "float32", [LR, LR * 2.0**-22])
    assert set(HistoryStore(tmp_path / "h").read("step")) == {0, 1}
    assert worst_relative_difference(tmp_path / "h", tmp_path / "fp32") < 2e-3


def test_step_above_the_scale_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"step 1: field 'net\.\d\.err' .*above the largest finite float16 value.*"
                                         "float32 or bfloat16"):
        record(tmp_path / "h", "float16", [LR, LR * 2.0**14])
    store = HistoryStore(tmp_path / "h")
    assert set(store.read("step")) == {0}
    assert all(np.isfinite(store.read(f).astype(np.float64)).all() for f in store.fields)


def test_resuming_a_store_from_before_scales_keeps_it_unscaled(tmp_path, recorded):
    shutil.copytree(recorded / "fp16-unscaled", tmp_path / "old")
    before = HistoryStore(tmp_path / "old").read("net.2.err")
    torch.manual_seed(0)
    model = TwoLayer()
    record(tmp_path / "old", "float16", [LR * 1000], model=model, resume=True)  # normal at scale 1
    store = HistoryStore(tmp_path / "old")
    assert SCALES not in store.attrs and field_scale(store.attrs, "net.2.err") == 1.0
    after = store.read("net.2.err")
    np.testing.assert_array_equal(after[: len(before)], before)
    assert FLOAT16_TINY <= np.abs(after[len(before):].astype(np.float64)).max() < 1e-2  # unscaled like the rest


@pytest.mark.parametrize("scale", [3.0, 0.0, -2.0, float("inf"), "8", True])
def test_a_scale_that_is_not_a_power_of_two_is_refused(scale):
    with pytest.raises(StoreError, match="not a positive power of two"):
        field_scale({SCALES: {"f": scale}}, "f")
    with pytest.raises(StoreError, match="must map field names"):
        field_scale({SCALES: [1.0]}, "f")
    assert field_scale({}, "f") == 1.0 and field_scale({SCALES: {"g": 4.0}}, "f") == 1.0


def test_recorder_refuses_attrs_that_are_its_own(tmp_path):
    with pytest.raises(ValueError, match="'value_scales' is the recorder's own"):
        HistoryRecorder(TwoLayer(), tmp_path / "h", MODULES, attrs={SCALES: {}})


def test_error_scale_shares_script(recorded, capsys):
    script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "error_scale_shares.py"))
    assert script["main"]([str(recorded / "fp32")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"net.0.err", "net.2.err"}
    for row in rows.values():  # unscaled: all subnormal, off by far more than the scaled float16 rounding
        assert float(row[3]) == 1.0 and float(row[5]) > 10 * float(row[10]) and float(row[9]) == 0.0
        assert 8 <= float(row[11]) < 65504 and float(row[12]) >= FLOAT16_TINY  # the steps fit the scale
