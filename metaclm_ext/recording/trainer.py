"""HistoryCallback: record a ``transformers.Trainer`` run with a :class:`HistoryRecorder`.

The recorder takes each micro-batch's ``labels``, ``input_ids`` and ``attention_mask`` from the model's
forward arguments; this callback ends each optimizer step in ``on_pre_optimizer_step``, which the Trainer
calls after gradient clipping and right before ``optimizer.step()``, and closes the recorder when training
ends. Rows are numbered with the Trainer's ``global_step`` (the steps completed before this one), and the
store is committed just before every checkpoint is saved, so a run resumed from a checkpoint with
``HistoryRecorder(..., resume=True)`` continues the store where that checkpoint left it.

    recorder = HistoryRecorder(model, "runs/history", modules="llama", dtype="float32")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[HistoryCallback(recorder)])
    trainer.train()
"""
from __future__ import annotations

from transformers import TrainerCallback

from .recorder import HistoryRecorder


class HistoryCallback(TrainerCallback):
    """Calls ``recorder.step(optimizer)`` before every optimizer step, ``recorder.commit()`` before every
    checkpoint and ``recorder.close()`` at the end."""

    def __init__(self, recorder: HistoryRecorder):
        if not isinstance(recorder, HistoryRecorder):
            raise TypeError(f"recorder must be a HistoryRecorder, got {type(recorder).__name__}")
        self.recorder = recorder

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("HistoryCallback: the Trainer passed no optimizer to on_pre_optimizer_step")
        self.recorder.step(optimizer, step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback, which runs before user callbacks, has decided whether a checkpoint follows.
        if control.should_save:
            self.recorder.commit()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.recorder.commit()

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.close()
