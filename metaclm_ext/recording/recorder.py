"""HistoryRecorder: the training history of selected linear layers of any PyTorch model, into a HistoryStore.

One row = one trained token (a position with a target) at one optimizer step. Per recorded module the
row holds its input x_t and (``errors=True``) its error signal

    e_t = -(lr * c) * dL/dy_t      (y the module's output),

lr the learning rate of the param group holding the module's weight at the step, and c the factor by
which the weight's gradient was scaled in place between the last backward and the optimizer step
(gradient clipping, a grad scaler's unscaling). c is measured, not told: a sample of the gradient noted
after each backward (a post-accumulate-grad hook) is fitted to the same entries at
:meth:`HistoryRecorder.step`. The raw dL/dy of every micro-batch already carries the loss's
1/accumulation scaling, so for plain SGD

    W_T = W_0 + sum_t e_t x_t^T  (nn.Linear, W [out, in]),   W_T = W_0 + sum_t x_t e_t^T  (Conv1D, W [in, out]),
    b_T = b_0 + sum_t e_t

over all recorded rows. Where that cannot hold, ``recording.json`` in the store folder says
``exact: false`` with the reasons: another optimizer, momentum or weight decay (the errors are then
-lr * dL/dy_t), a position that is not recorded but carries a nonzero error (prompt masking), a gradient
changed by more than one factor, a bias stepped differently from its weight.

Usage in a hand-written loop::

    recorder = HistoryRecorder(model, "runs/history", modules="llama")
    for batch in loader:
        for micro in split(batch):
            with recorder.capture():      # targets from micro["labels"]; or capture(targets=...)
                loss = model(**micro).loss / len(split(batch))
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        recorder.step(optimizer)          # after clipping, right before optimizer.step()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
    recorder.close()

Without ``capture()`` the recorder takes the targets from the model's forward arguments (by default its
``labels``, shifted HF-style; ``targets_from`` says otherwise), and ``input_ids`` and ``attention_mask``
too, which is how :class:`~metaclm_ext.recording.trainer.HistoryCallback` records under
``transformers.Trainer``. Forwards with grad disabled (evaluation) are ignored.

Memory is bounded by one step and one store shard: rows are masked to the trained positions and copied
off the device as the hooks fire (pinned, non-blocking copies on CUDA), kept until
:meth:`HistoryRecorder.step` and appended there in one batch. Every ``commit_every`` steps, and at
:meth:`HistoryRecorder.commit`, the store is committed, so a recording resumed after a crash
(``resume=True``) continues after the last commit; resume the training from the checkpoint saved with it.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

import numpy as np
import torch

from ..dtypes import HISTORY_DTYPE_NAMES
from ..store import MANIFEST, HistoryStore, HistoryWriter
from ..store.scales import SCALES, check_scaled_range, choose_scale, field_scale
from .data_parallel import after_backward, averaged_over, largest_over_ranks, rank_group, recorded_model
from .files import STATUS, WEIGHTS_END, WEIGHTS_START, read_status, save_weights, write_status
from .modules import ModuleSpec, Selector, select_modules
from .optimizer import learning_rate, not_plain_sgd, param_groups_by_id, unwrap_optimizer
from .rows import BASE_COLUMNS, MicroBatchRows, labels_as_targets, micro_batch_rows
from .scaling import grad_sample, is_one_factor, scale_fit

FORMAT_VERSION = 1
# A commit rewrites the store's open shard, so shards are sized by bytes (whatever the row width): at
# most this much is rewritten per commit besides the new rows, and buffered in memory.
SHARD_BYTES = 64 << 20
MAX_SHARD_ROWS = 65536
ERROR_DEFINITION = ("e_t = -(lr * c) * dL/dy_t at the module's output y: lr of the weight's param group at the step, "
                    "c the in-place scaling of the weight's gradient after the last backward (clipping, unscaling)")
RAW_ERROR_DEFINITION = "e_t = -lr * dL/dy_t at the module's output y (the optimizer is not plain SGD)"
# Relative difference of the weight's and the bias's gradient scaling above which they count as different.
SCALE_MISMATCH = 1e-6


class _MicroBatch:
    """One forward/backward's captured rows, on the host, until the optimizer step."""

    def __init__(self, rows: MicroBatchRows):
        self.rows = rows
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}  # one entry per backward through the module's output
        self.dropped_max: dict[str, torch.Tensor] = {}  # max |dL/dy| over positions that are not rows
        self.backward = False
        self._index: dict[tuple, torch.Tensor] = {}

    def index(self, which: str, device: torch.device) -> torch.Tensor:
        """The kept or dropped flat position indices on ``device`` (copied once per device)."""
        key = (which, device)
        if key not in self._index:
            self._index[key] = getattr(self.rows, which).to(device)
        return self._index[key]


class HistoryRecorder:
    """Records the inputs (and error signals) of ``modules`` of ``model`` into a HistoryStore at ``path``.

    ``modules``: a preset name ("gpt2", "llama", "gemma3") or module-name patterns (see
    :func:`~metaclm_ext.recording.modules.select_modules`). ``dtype``: the store's float type for the rows
    ("float16", "bfloat16" or "float32"; the exactness check needs "float32"); each error field is stored
    times a power-of-two scale that keeps float16 errors out of its subnormal range (store/scales.py, in
    the store's attrs; readers divide by it with ``true_units``). ``columns``: extra int
    metadata columns {name: "int64"|"int32"}, given per micro-batch to :meth:`capture`. ``shard_rows``:
    rows per store shard (default: about 64 MiB of rows). ``attrs``: extra JSON run information for the
    store. ``targets_from(args, kwargs)`` gives a training forward's targets when :meth:`capture` does not
    (default: the shifted HF ``labels``). ``commit_every``: steps per commit (each commit fsyncs a file per
    field and column; :meth:`commit` commits at any step, as :class:`HistoryCallback` does at every
    checkpoint). ``resume=True`` continues an existing recording (same fields and modules) after its last
    commit (rows the store committed on its own after it, a possibly partial step, are dropped), or, with
    ``resume_at_step=S``, at step S: the rows of steps S and later (recorded after the checkpoint a
    resumed training restarts from) are dropped too. Without ``resume``, ``path`` must not hold a store yet.
    """

    def __init__(self, model: torch.nn.Module, path: Union[str, Path], modules: Selector, *, errors: bool = True,
                 dtype: str = "float16", columns: Optional[Mapping[str, str]] = None,
                 attrs: Optional[Mapping] = None, shard_rows: Optional[int] = None, commit_every: int = 1,
                 resume: bool = False, resume_at_step: Optional[int] = None,
                 targets_from: Callable[[tuple, dict], Optional[torch.Tensor]] = labels_as_targets):
        if dtype not in HISTORY_DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(HISTORY_DTYPE_NAMES)}, got {dtype!r}")
        self.specs: list[ModuleSpec] = select_modules(recorded_model(model), modules)
        if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every <= 0:
            raise ValueError(f"commit_every must be a positive int (steps), got {commit_every!r}")
        self._averaged_over = averaged_over(model)  # DDP's ranks (data_parallel.py); 1 without DDP
        self._group = rank_group(model)
        self._noting = False  # an end-of-backward note of the gradients is queued (under DDP)
        self.errors, self.path, self._targets_from = bool(errors), Path(path), targets_from
        self.commit_every, self._uncommitted_steps = commit_every, 0
        self._dtype = HISTORY_DTYPE_NAMES[dtype]
        self.user_columns = dict(columns or {})
        clash = set(self.user_columns) & set(BASE_COLUMNS)
        if clash:
            raise ValueError(f"columns {sorted(clash)} are recorded anyway: choose other names")
        if self.errors:
            frozen = [s.name for s in self.specs if not all(p.requires_grad for p in self._params(s))]
            if frozen:
                raise ValueError(f"errors=True needs trained weights and biases, but those of {frozen} have "
                                 "requires_grad=False (record their inputs with errors=False)")
        fields = {s.input_field: (s.in_features, dtype) for s in self.specs}
        if self.errors:
            fields.update({s.error_field: (s.out_features, dtype) for s in self.specs})
        columns_spec = {**{c: "int64" for c in BASE_COLUMNS}, **self.user_columns}
        recording = {"version": FORMAT_VERSION, "row": "one trained token (a position with a target) at one "
                     "optimizer step", "errors": ERROR_DEFINITION if self.errors else None,
                     "modules": [s.describe() for s in self.specs],
                     "files": {"weights_start": WEIGHTS_START, "weights_end": WEIGHTS_END, "status": STATUS}}
        attrs = dict(attrs or {})
        for key in ("recording", SCALES):
            if key in attrs:
                raise ValueError(f"attrs key {key!r} is the recorder's own: choose another name")
        self._history_dtype = dtype
        self._scales: dict[str, float] = {}  # error field -> its store scale, once chosen (store/scales.py)
        self._last_step, self._next_sequence = -1, 0
        exists = (self.path / MANIFEST).exists()
        if resume_at_step is not None and (not resume or not exists):
            raise ValueError(f"resume_at_step needs resume=True and an existing store at {self.path}")
        if exists and not resume:
            raise FileExistsError(f"{self.path} holds a history store already: pass resume=True to continue it, "
                                  "or record into another folder")
        if exists:
            self.writer = self._resume(fields, columns_spec, recording, resume_at_step)
        else:
            if shard_rows is None:
                row_bytes = sum(w for w, _ in fields.values()) * self._dtype.itemsize + 8 * len(columns_spec)
                shard_rows = max(1, min(MAX_SHARD_ROWS, SHARD_BYTES // row_bytes))
            self.writer = HistoryWriter.create(self.path, fields, columns_spec, shard_rows=shard_rows,
                                               attrs={**attrs, "recording": recording, SCALES: {}})
            self.status = {"exact": True, "reasons": [], "optimizer": None,
                           "errors": ERROR_DEFINITION if self.errors else None, "committed_rows": 0,
                           "closed": False}
            write_status(self.path, self.status)
        if not (self.path / WEIGHTS_START).exists():
            save_weights(self.path / WEIGHTS_START, self.specs)

        self._pending: list[_MicroBatch] = []
        self._current: Optional[_MicroBatch] = None
        self._explicit: Optional[dict] = None  # what capture() was given for the micro-batch it wraps
        self._noted: dict[int, torch.Tensor] = {}  # id(param) -> sample of its grad after the last backward
        self._copies: list = []  # CUDA events of the pending non-blocking copies
        self._handles = [model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True)]
        for spec in self.specs:
            self._handles.append(spec.module.register_forward_hook(partial(self._on_module_forward, spec)))
            if self.errors:
                for param in self._params(spec):
                    self._handles.append(param.register_post_accumulate_grad_hook(self._note_grad))
        self.closed = False

    def _resume(self, fields: dict, columns: dict, recording: dict, at_step: Optional[int]) -> HistoryWriter:
        store = HistoryStore(self.path)
        if store.fields != fields or store.columns != columns:
            raise ValueError(f"the store at {self.path} has fields {store.fields} and columns {store.columns}, not "
                             f"this recorder's {fields} and {columns}: resume with the same modules, errors, dtype "
                             "and columns, or record into a new folder")
        if store.attrs.get("recording", {}).get("modules") != recording["modules"]:
            raise ValueError(f"the store at {self.path} recorded other modules: {store.attrs.get('recording')}")
        n, status = len(store), read_status(self.path)
        if n < status["committed_rows"]:
            raise ValueError(f"the store at {self.path} holds {n} rows but the recorder committed "
                             f"{status['committed_rows']}: it was cut or damaged; record into a new folder")
        n = status["committed_rows"]
        if at_step is not None:
            if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
                raise ValueError(f"resume_at_step must be an int >= 0, got {at_step!r}")
            n = int(np.searchsorted(store.read("step", 0, n), at_step, side="left"))
            last = int(store.read("step", n - 1, n)[0]) if n else -1
            if last != at_step - 1:
                raise ValueError(f"the store at {self.path} ends at step {last}, so it cannot continue at step "
                                 f"{at_step}: steps {last + 1}..{at_step - 1} were never committed")
        if SCALES in store.attrs:
            self._scales = {f: field_scale(store.attrs, f) for f in store.attrs[SCALES]}
        else:  # recorded before stores had scales: its errors are unscaled, and so must the rest be
            self._scales = {s.error_field: 1.0 for s in self.specs} if self.errors else {}
        if n:
            self._last_step = int(store.read("step", n - 1, n)[0])
            self._next_sequence = int(store.read("sequence", n - 1, n)[0]) + 1
        writer = HistoryWriter.resume(self.path)
        if n < len(store):
            try:
                writer.truncate(n)
            except BaseException:
                writer.close()
                raise
        self.status = {**status, "committed_rows": n, "closed": False}
        write_status(self.path, self.status)
        return writer

    # -- state ---------------------------------------------------------------------------------------
    @property
    def exact(self) -> bool:
        """Whether, so far, the recorded errors sum exactly to the weight changes (see ``reasons``)."""
        return self.status["exact"]

    @property
    def reasons(self) -> list[str]:
        return list(self.status["reasons"])

    @property
    def next_step(self) -> int:
        """The step number the next :meth:`step` records (after the last committed one)."""
        return self._last_step + 1

    def __enter__(self) -> "HistoryRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- capture -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, targets: Optional[torch.Tensor] = None, *, tokens: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                metadata: Optional[Mapping[str, torch.Tensor]] = None) -> Iterator[None]:
        """Wrap one micro-batch's forward and backward.

        ``targets`` [B, T]: the token each position is trained to predict (-100: none; see
        :func:`~metaclm_ext.recording.rows.targets_from_labels` for HF ``labels``); when omitted, the model's
        ``labels`` argument is used. ``tokens`` / ``attention_mask`` default to the model's ``input_ids`` /
        ``attention_mask`` arguments. ``metadata`` gives every extra column as [B] or [B, T] integers.
        """
        self._check_open()
        if self._explicit is not None:
            raise RuntimeError("capture() is already active: use one capture() per micro-batch, not nested ones")
        self._explicit = {"targets": targets, "tokens": tokens, "attention_mask": attention_mask,
                          "metadata": dict(metadata or {})}
        self._current = None
        try:
            yield
        finally:
            self._explicit, self._current = None, None

    def _start_micro_batch(self, args: tuple, kwargs: dict) -> _MicroBatch:
        given = self._explicit or {"metadata": {}}
        targets = given.get("targets")
        if targets is None:
            targets = self._targets_from(args, kwargs)
            if targets is None:
                raise ValueError("HistoryRecorder: a training forward without targets: pass targets= to "
                                 "recorder.capture() or labels= to the model (or set targets_from)")
        tokens = given.get("tokens")
        if tokens is None:
            tokens = kwargs.get("input_ids")
            if tokens is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
                tokens = args[0]
        mask = given.get("attention_mask")
        if mask is None:
            mask = kwargs.get("attention_mask")
        rows = micro_batch_rows(targets, mask, tokens, given["metadata"], self.user_columns)
        batch = _MicroBatch(rows)
        self._pending.append(batch)
        return batch

    # -- hooks ---------------------------------------------------------------------------------------
    def _on_model_forward(self, model, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            self._current = None
            return
        if self._explicit is not None and self._current is not None:
            raise RuntimeError("the model ran forward twice inside one capture(): use one capture() per micro-batch")
        self._current = self._start_micro_batch(args, kwargs)

    def _on_module_forward(self, spec: ModuleSpec, module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if self._current is None:
            if self._explicit is None:
                return  # a submodule called outside a recorded forward
            self._current = self._start_micro_batch((), {})
        batch = self._current
        if spec.name in batch.inputs:
            raise RuntimeError(f"module {spec.name} ran twice in one forward (shared weights, or activation "
                               "checkpointing recomputing it): HistoryRecorder records one call per forward")
        x = inputs[0].detach().reshape(-1, spec.in_features)
        if x.shape[0] != batch.rows.num_positions:
            raise ValueError(f"module {spec.name} saw {x.shape[0]} positions but the targets cover "
                             f"{batch.rows.batch_size} x {batch.rows.positions_per_sequence}")
        batch.inputs[spec.name] = self._to_host(x.index_select(0, batch.index("kept", x.device)).to(self._dtype))
        if output.requires_grad:
            output.register_hook(partial(self._on_output_grad, batch, spec))

    def _on_output_grad(self, batch: _MicroBatch, spec: ModuleSpec, grad: torch.Tensor) -> None:
        batch.backward = True
        if not self.errors:
            return
        g = grad.detach().reshape(-1, spec.out_features)
        batch.grads.setdefault(spec.name, []).append(self._to_host(g.index_select(0, batch.index("kept", g.device))))
        if len(batch.rows.dropped):
            dropped = g.index_select(0, batch.index("dropped", g.device)).abs().max().double()
            previous = batch.dropped_max.get(spec.name)
            batch.dropped_max[spec.name] = dropped if previous is None else torch.maximum(previous, dropped.to(previous))

    def _note_grad(self, param: torch.Tensor) -> None:
        if self._averaged_over == 1:
            self._noted[id(param)] = grad_sample(param.grad)
        elif not self._noting:  # DDP: the averaged gradients exist only once the backward has ended
            self._noting = True
            after_backward(self._note_averaged_grads)

    def _note_averaged_grads(self) -> None:
        self._noting = False
        for spec in self.specs:
            for param in self._params(spec):
                if param.grad is not None:
                    self._noted[id(param)] = grad_sample(param.grad)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copies.append(event)
        return host

    # -- the optimizer step --------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, step: Optional[int] = None) -> Optional[int]:
        """Append and commit the rows of every micro-batch since the last step; returns the step number,
        or None when a gradient is not finite (a grad scaler then skips the optimizer step: so does this).

        Call it after gradient clipping / unscaling and right before ``optimizer.step()``: it reads the
        learning rates and measures the gradient scaling now. ``step`` numbers the rows (default: one more
        than the last recorded step; it must be larger than that).
        """
        self._check_open()
        opt = unwrap_optimizer(optimizer)
        number = self.next_step if step is None else step
        if isinstance(number, bool) or not isinstance(number, int) or number <= self._last_step:
            raise ValueError(f"step must be an int after the last recorded step {self._last_step}, got {step!r}")
        batches = [b for b in self._pending if b.backward]
        self._pending, self._current = [], None
        if not batches:
            raise RuntimeError("HistoryRecorder.step(): no backward since the last step (call loss.backward() on a "
                               "recorded forward before step())")
        for event in self._copies:
            event.synchronize()
        self._copies = []
        factors = self._error_factors(opt, batches) if self.errors else {}
        self._noted, self._noting = {}, False  # also after a backward that raised before its callbacks ran
        rows = self._rows(batches, number, factors) if factors is not None else None
        maxima = self._error_maxima(rows) if rows is not None else None
        if maxima is None or not all(math.isfinite(m) for m in maxima.values()):
            warnings.warn("HistoryRecorder: a recorded gradient is not finite; the step's rows are dropped (a grad "
                          "scaler skips this optimizer step)")
            return None
        self.writer.append(self._stored(rows, number, maxima))
        self._last_step = number
        self._next_sequence += sum(b.rows.batch_size for b in batches)
        self._uncommitted_steps += 1
        if self._uncommitted_steps >= self.commit_every:
            self.commit()
        return number

    def commit(self) -> None:
        """Commit the steps recorded so far: a recording resumed after a crash continues after them."""
        self._check_open()
        self.writer.flush()
        self._uncommitted_steps = 0
        if self.status["committed_rows"] != self.writer.committed_rows:
            self.status = {**self.status, "committed_rows": self.writer.committed_rows}
            write_status(self.path, self.status)

    def _rows(self, batches: list[_MicroBatch], number: int, factors: dict[str, float]) -> dict:
        """The step's rows, e_t in fp64 (see :meth:`_stored`)."""
        columns = {c: [] for c in (*BASE_COLUMNS, *self.user_columns)}
        sequence = self._next_sequence
        for index, batch in enumerate(batches):
            n = len(batch.rows.kept)
            columns["step"].append(torch.full((n,), number, dtype=torch.long))
            columns["micro_batch"].append(torch.full((n,), index, dtype=torch.long))
            columns["sequence"].append(batch.rows.columns["sequence"] + sequence)
            sequence += batch.rows.batch_size
            for name in ("position", "token", "target", *self.user_columns):
                columns[name].append(batch.rows.columns[name])
        rows = {name: torch.cat(parts) for name, parts in columns.items()}
        for spec in self.specs:
            rows[spec.input_field] = torch.cat([b.inputs[spec.name] for b in batches])
            if self.errors:
                grads = [sum(b.grads[spec.name][1:], b.grads[spec.name][0]) for b in batches]
                rows[spec.error_field] = torch.cat(grads).double() * factors[spec.name]
        return rows

    def _error_maxima(self, rows: dict) -> dict[str, float]:
        """{error field: largest |e_t| of the step} (0 for no rows; NaN or inf when an error is not finite),
        with one host transfer per device for all fields."""
        fields = [spec.error_field for spec in self.specs] if self.errors else []
        peaks = [rows[f].abs().amax() if rows[f].numel() else rows[f].new_zeros(()) for f in fields]
        return dict(zip(fields, _host_floats(peaks)))

    def _stored(self, rows: dict, number: int, maxima: dict[str, float]) -> dict:
        """The step's rows with each error field times its store scale, in the store's type (``maxima``: each
        error field's largest |e_t|, :meth:`_error_maxima`). A field's scale is chosen at its first step with
        a nonzero error (zeros are exact at any scale; under DDP over all ranks' rows) and kept in the store's
        attrs before any row it scales is written; a step that does not fit the field's scale raises before
        anything of it is written."""
        choosing = maxima
        if self._group is not None and any(f not in self._scales for f in maxima):  # the same on every rank
            device = self.specs[0].module.weight.device
            choosing = dict(zip(maxima, largest_over_ranks(list(maxima.values()), self._group, device)))
        chosen = {f: choose_scale(m, self._history_dtype) for f, m in choosing.items() if f not in self._scales and m > 0}
        scales = {**self._scales, **chosen}
        for field, max_abs in maxima.items():
            check_scaled_range(field, number, max_abs, scales.get(field, 1.0), self._history_dtype)
        if chosen:
            self.writer.update_attrs({SCALES: scales})
            self._scales = scales
        return {name: values.mul_(scales.get(name, 1.0)).to(self._dtype) if name in maxima else values
                for name, values in rows.items()}

    def _error_factors(self, opt: torch.optim.Optimizer, batches: list[_MicroBatch]) -> Optional[dict[str, float]]:
        """{module: -(lr * c)} (or -lr where the update is not plain SGD), updating the exactness status;
        None when a gradient sample is not finite."""
        groups = param_groups_by_id(opt)
        measured: list[torch.Tensor] = []
        for spec in self.specs:
            missing = [b for b in batches if spec.name not in b.grads]
            if missing:
                raise RuntimeError(f"no error reached module {spec.name} in {len(missing)} micro-batch(es) with a "
                                   "backward: is it on the loss's path?")
            for param in self._params(spec):
                if id(param) not in groups:
                    raise ValueError(f"the optimizer does not update {spec.name}'s parameters: the weight change "
                                     "could not be a sum of its errors")
                if param.grad is None or id(param) not in self._noted:
                    raise RuntimeError(f"{spec.name}'s gradient is gone (zero_grad before step()?): call "
                                       "recorder.step(optimizer) right before optimizer.step()")
                measured += list(scale_fit(self._noted[id(param)], grad_sample(param.grad)))
            measured += [b.dropped_max[spec.name] for b in batches if spec.name in b.dropped_max]
        values = iter(_host_floats(measured))
        factors, reasons, raw = {}, [], False
        for spec in self.specs:
            coefficients, lrs = [], []
            for param in self._params(spec):
                c, residual = next(values), next(values)
                if not (math.isfinite(c) and math.isfinite(residual)):
                    return None
                if not is_one_factor(residual, param.grad.dtype):
                    reasons.append(f"{spec.name}'s gradient was changed by more than one factor between the last "
                                   "backward and the step (e.g. clip_grad_value_)")
                coefficients.append(c / self._averaged_over)
                lrs.append(learning_rate(groups[id(param)]))
            dropped = [next(values) for b in batches if spec.name in b.dropped_max]
            reason = not_plain_sgd(opt, groups[id(spec.module.weight)])
            if reason is not None:
                reasons.append(f"{reason}: its update is not a sum of the errors, recorded as -lr * dL/dy")
                factors[spec.name], raw = -lrs[0], True
                continue
            factors[spec.name] = -lrs[0] * coefficients[0]
            # Reasons name no per-step numbers, so that each is recorded once, however many steps show it.
            mismatch = abs(coefficients[-1] - coefficients[0]) > SCALE_MISMATCH * coefficients[0]
            if len(lrs) == 2 and (lrs[1] != lrs[0] or mismatch):
                reasons.append(f"{spec.name}'s bias gets another step size than its weight (another param group's "
                               "lr, or another gradient scaling)")
            if dropped and max(dropped) > 0:
                reasons.append(f"positions without a target carry a nonzero error at {spec.name} (e.g. prompt "
                               "masking): the weight change includes rows that are not recorded")
        self._update_status(reasons, type(opt).__name__, RAW_ERROR_DEFINITION if raw else ERROR_DEFINITION)
        return factors

    def _update_status(self, reasons: list[str], optimizer: str, errors: str) -> None:
        """Record new reasons for inexactness (before the step's rows are committed: a crash in between
        leaves the store marked not exact rather than the other way round)."""
        new = [r for r in dict.fromkeys(reasons) if r not in self.status["reasons"]]
        if self.status["errors"] == RAW_ERROR_DEFINITION:
            errors = RAW_ERROR_DEFINITION  # once raw, the history mixes both definitions: say the weaker
        if new or self.status["optimizer"] != optimizer or self.status["errors"] != errors:
            self.status = {**self.status, "optimizer": optimizer, "errors": errors,
                           "exact": self.status["exact"] and not new, "reasons": self.status["reasons"] + new}
            write_status(self.path, self.status)

    @staticmethod
    def _params(spec: ModuleSpec) -> list[torch.Tensor]:
        return [spec.module.weight] + ([spec.module.bias] if spec.has_bias else [])

    # -- the end -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach from the model, save the recorded modules' final weights and commit the store. Call it
        after the last optimizer step. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for handle in self._handles:
            handle.remove()
        if any(b.backward for b in self._pending):
            warnings.warn("HistoryRecorder.close(): micro-batches after the last step() are not recorded")
        self._pending, self._current = [], None
        try:
            save_weights(self.path / WEIGHTS_END, self.specs)
            self.writer.flush()
            self.status = {**self.status, "committed_rows": self.writer.committed_rows, "closed": True}
            write_status(self.path, self.status)
        finally:
            self.writer.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"HistoryRecorder for {self.path} is closed")


def _host_floats(values: list[torch.Tensor]) -> list[float]:
    """Scalars from any devices as floats, with one transfer per device rather than one per scalar."""
    out: list[Optional[float]] = [None] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for device, indices in by_device.items():
        host = torch.stack([values[i].to(torch.float64) for i in indices]).cpu().tolist()
        for i, v in zip(indices, host):
            out[i] = v
    return out
