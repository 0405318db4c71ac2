"""metaclm_ext.recording: recording any model's history, exactly, in a plain loop and under Trainer.

Every exactness test trains with gradient clipping that is active at every step (the clip coefficient is
at most 1/1.1, so errors that ignored it would be off by 10 % or more), a decaying learning rate and two
micro-batches per step, and then rebuilds each module's weight change from the store alone.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from helpers import requires_cuda
from metaclm_ext import HistoryStore
from metaclm_ext.recording import (
    IGNORE,
    HistoryCallback,
    HistoryRecorder,
    dualcheck_store,
    format_report,
    select_modules,
    targets_from_labels,
)

transformers.logging.set_verbosity_error()

VOCAB, SEQ, BATCH, ACCUM, STEPS = 50, 8, 2, 2, 3
LR, MAX_NORM = 1.0, 0.1
CLIPPED = 1.1  # every step's gradient norm must exceed MAX_NORM by this factor


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))


def gemma3():
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, sliding_window=4, bos_token_id=0, eos_token_id=1,
                                              pad_token_id=1))


LMS = {"gpt2": gpt2, "llama": llama, "gemma3": gemma3}


class Tagger(nn.Module):
    """A plain nn.Sequential of nn.Linear layers, tagging every position; Trainer-shaped (returns the loss)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))

    def forward(self, inputs, targets):
        logits = self.net(inputs)
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1), ignore_index=IGNORE)}


TAGGER_MODULES = ["net.0", "re:net\\.[24]"]


def lm_micro_batch(gen):
    """Two sequences, the second right-padded over its last two positions (attention mask 0, label -100)."""
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tagger_micro_batch(gen):
    targets = torch.randint(0, 5, (BATCH, SEQ), generator=gen)
    targets[0, :3] = IGNORE
    return {"inputs": torch.randn(BATCH, SEQ, 8, generator=gen), "targets": targets}


def train_loop(model, recorder, make_batch, optimizer="sgd", steps=STEPS, capture=None):
    """SGD (or AdamW) with accumulation, clipping and a decaying schedule; returns the clipped norms."""
    gen = torch.Generator().manual_seed(1)
    opt = (torch.optim.SGD(model.parameters(), lr=LR) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.25 * s)
    norms = []
    for _ in range(steps):
        for _ in range(ACCUM):
            batch = make_batch(gen)
            with recorder.capture(**(capture(batch) if capture else {})):
                loss = model(**batch)["loss"] / ACCUM
                loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        recorder.step(opt)
        opt.step()
        sched.step()
        opt.zero_grad()
    recorder.close()
    return norms


def assert_exact(path, norms):
    assert min(norms) > CLIPPED * MAX_NORM, f"clipping was not active at every step: {norms}"
    report = dualcheck_store(path)
    assert report["exact"] is True and report["reasons"] == []
    assert report["passed"] is True, format_report(report)
    assert report["max_relative_error"] < 1e-5
    for module in report["modules"]:  # the weights really moved, so the check compared something
        assert module["change"] > 1e-3
    return report


# --------------------------------------------------------------------------------------------------
# Exactness: plain loop


@pytest.mark.parametrize("arch", sorted(LMS))
def test_preset_lm_loop_is_exact(tmp_path, arch):
    torch.manual_seed(0)
    model = LMS[arch]()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=arch, dtype="float32")
    norms = train_loop(model, recorder, lm_micro_batch)
    report = assert_exact(tmp_path / "h", norms)
    assert [m["input_field"] for m in report["modules"]] == ["attn_in.0", "mlp_in.0", "attn_in.1", "mlp_in.1"]
    store = HistoryStore(tmp_path / "h")
    # per micro-batch: 7 targets in the full sequence, 5 in the padded one (the last position has none)
    assert len(store) == STEPS * ACCUM * (SEQ - 1 + SEQ - 3)
    np.testing.assert_array_equal(np.unique(store.read("step")), np.arange(STEPS))
    assert set(store.read("micro_batch")) == {0, 1}


@requires_cuda
def test_cuda_loop_is_exact(tmp_path):
    """Rows leave the GPU by pinned non-blocking copies, synchronised at the step."""
    torch.manual_seed(0)
    model = llama().cuda()
    recorder = HistoryRecorder(model, tmp_path / "h", modules="llama", dtype="float32")

    def on_gpu(gen):
        return {k: v.cuda() for k, v in lm_micro_batch(gen).items()}

    assert_exact(tmp_path / "h", train_loop(model, recorder, on_gpu))
    assert len(HistoryStore(tmp_path / "h")) == STEPS * ACCUM * (SEQ - 1 + SEQ - 3)


def test_pattern_sequential_loop_is_exact(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=TAGGER_MODULES, dtype="float32",
                               targets_from=lambda args, kwargs: kwargs["targets"])
    norms = train_loop(model, recorder, tagger_micro_batch)
    report = assert_exact(tmp_path / "h", norms)
    assert [m["input_field"] for m in report["modules"]] == ["net.0.in", "net.2.in", "net.4.in"]
    assert all(m["bias_relative_error"] < 1e-5 for m in report["modules"])


def test_rows_are_the_trained_positions(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.0"], dtype="float32", errors=False,
                               columns={"doc": "int64", "offset": "int64"})
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = tagger_micro_batch(gen)
    docs, offsets = torch.tensor([10, 11]), torch.arange(BATCH * SEQ).reshape(BATCH, SEQ)
    with recorder.capture(batch["targets"], metadata={"doc": docs, "offset": offsets}):
        model(**batch)["loss"].backward()
    with torch.no_grad():  # an evaluation forward between training steps records nothing
        model(**tagger_micro_batch(gen))
    recorder.step(opt)
    recorder.close()
    store = HistoryStore(tmp_path / "h")
    kept = batch["targets"] != IGNORE
    b, p = kept.nonzero(as_tuple=True)
    np.testing.assert_array_equal(store.read("net.0.in"), batch["inputs"][kept].numpy())
    np.testing.assert_array_equal(store.read("sequence"), b.numpy())
    np.testing.assert_array_equal(store.read("position"), p.numpy())
    np.testing.assert_array_equal(store.read("target"), batch["targets"][kept].numpy())
    np.testing.assert_array_equal(store.read("token"), np.full(len(b), -1))
    np.testing.assert_array_equal(store.read("doc"), docs[b].numpy())
    np.testing.assert_array_equal(store.read("offset"), offsets[kept].numpy())
    with pytest.raises(ValueError, match="errors=False"):
        dualcheck_store(tmp_path / "h")


def test_explicit_targets_tokens_and_attrs(tmp_path):
    torch.manual_seed(0)
    model = gemma3()
    recorder = HistoryRecorder(model, tmp_path / "h", modules="gemma3", dtype="float32", attrs={"run": "x"})
    first = {}

    def explicit(batch):
        first.setdefault("batch", batch)
        return {"targets": targets_from_labels(batch["labels"])}

    norms = train_loop(model, recorder, lm_micro_batch, capture=explicit)
    assert_exact(tmp_path / "h", norms)
    store = HistoryStore(tmp_path / "h")
    ids, labels = first["batch"]["input_ids"], first["batch"]["labels"]
    targets = targets_from_labels(labels)
    n = int((targets != IGNORE).sum())
    np.testing.assert_array_equal(store.read("token", 0, n), ids[targets != IGNORE].numpy())
    np.testing.assert_array_equal(store.read("target", 0, n), targets[targets != IGNORE].numpy())
    attrs = store.attrs
    assert attrs["run"] == "x"
    attn = {m["input_field"]: m for m in attrs["recording"]["modules"]}["attn_in.1"]
    assert (attn["module"], attn["layout"], attn["role"], attn["layer"]) == ("model.layers.1.self_attn.o_proj",
                                                                           "linear", "attn", 1)
    assert (attn["heads"], attn["head_dim"], attn["in_features"], attn["out_features"]) == (4, 16, 64, 32)
    mlp = {m["input_field"]: m for m in attrs["recording"]["modules"]}["mlp_in.0"]
    assert (mlp["heads"], mlp["error_field"], mlp["in_features"]) == (None, "mlp_err.0", 64)


def test_gpt2_conv1d_layout_and_heads(tmp_path):
    specs = select_modules(gpt2(), "gpt2")
    assert [(s.name, s.layout, s.role, s.layer, s.heads, s.head_dim) for s in specs[:2]] == [
        ("transformer.h.0.attn.c_proj", "conv1d", "attn", 0, 4, 8),
        ("transformer.h.0.mlp.c_proj", "conv1d", "mlp", 0, None, None)]
    assert (specs[1].in_features, specs[1].out_features) == (128, 32)


def test_prompt_masking_is_marked_not_exact(tmp_path):
    torch.manual_seed(0)
    model = llama()
    recorder = HistoryRecorder(model, tmp_path / "h", modules="llama", dtype="float32")

    def prompt_masked(gen):
        batch = lm_micro_batch(gen)
        batch["labels"][:, :4] = IGNORE  # the prompt: attended to by trained positions, so it carries errors
        return batch

    train_loop(model, recorder, prompt_masked)
    report = dualcheck_store(tmp_path / "h")
    assert report["exact"] is False and report["passed"] is None
    masked = [r for r in report["reasons"] if "positions without a target carry a nonzero error" in r]
    assert masked and len(masked) == len(report["reasons"]) <= 4  # once per module, not once per step
    assert json.loads((tmp_path / "h" / "recording.json").read_text())["exact"] is False


def test_adamw_loop_is_marked_not_exact(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    recorder = HistoryRecorder(model, tmp_path / "h", modules="gpt2", dtype="float32")
    train_loop(model, recorder, lm_micro_batch, optimizer="adamw")
    report = dualcheck_store(tmp_path / "h")
    assert report["exact"] is False and report["passed"] is None and report["optimizer"] == "AdamW"
    assert report["reasons"] == ["the optimizer is AdamW, not plain SGD: its update is not a sum of the errors, "
                                 "recorded as -lr * dL/dy"]
    assert "NOT EXACT" in format_report(report)
    status = json.loads((tmp_path / "h" / "recording.json").read_text())
    assert status["errors"].startswith("e_t = -lr * dL/dy_t") and status["closed"] is True


def test_bias_with_another_lr_is_marked_not_exact(tmp_path):
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.4"], targets_from=lambda a, kw: kw["targets"])
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    opt = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 0.05}], lr=0.1)
    model(**tagger_micro_batch(torch.Generator().manual_seed(0)))["loss"].backward()
    recorder.step(opt)
    recorder.close()
    assert recorder.reasons == ["net.4's bias gets another step size than its weight (another param group's lr, "
                                "or another gradient scaling)"]


def test_gradient_changed_by_more_than_one_factor_is_marked_not_exact(tmp_path):
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.4"], targets_from=lambda a, kw: kw["targets"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**tagger_micro_batch(torch.Generator().manual_seed(0)))["loss"].backward()
    limit = float(model.net[4].weight.grad.abs().median())
    torch.nn.utils.clip_grad_value_(model.parameters(), limit)
    recorder.step(opt)
    recorder.close()
    assert recorder.reasons[0].startswith("net.4's gradient was changed by more than one factor")


def test_step_with_non_finite_gradients_is_dropped(tmp_path):
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.4"], targets_from=lambda a, kw: kw["targets"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**tagger_micro_batch(torch.Generator().manual_seed(0)))["loss"].backward()
    model.net[4].weight.grad[0, 0] = float("inf")  # what a grad scaler finds before it skips the step
    with pytest.warns(UserWarning, match="not finite"):
        assert recorder.step(opt) is None
    assert recorder.next_step == 0
    opt.zero_grad()
    model(**tagger_micro_batch(torch.Generator().manual_seed(0)))["loss"].backward()
    # Finite errors beyond float16's range are no reason to drop a step: the field's scale brings them in.
    assert recorder.step(torch.optim.SGD(model.parameters(), lr=1e9)) == 0
    recorder.close()
    store = HistoryStore(tmp_path / "h")
    assert set(store.read("step")) == {0} and store.attrs["value_scales"][recorder.specs[0].error_field] < 1


def test_float16_history_gets_no_verdict(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.4"],
                               targets_from=lambda args, kwargs: kwargs["targets"])
    train_loop(model, recorder, tagger_micro_batch)
    report = dualcheck_store(tmp_path / "h")
    assert report["history_dtype"] == ["float16"] and report["exact"] is True and report["passed"] is None
    assert report["max_relative_error"] < 1e-2  # fp16 rounding only


def test_resume_continues_without_gaps(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    kwargs = dict(modules=TAGGER_MODULES, dtype="float32", targets_from=lambda args, kw: kw["targets"])
    norms = train_loop(model, HistoryRecorder(model, tmp_path / "h", **kwargs), tagger_micro_batch, steps=2)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        HistoryRecorder(model, tmp_path / "h", **kwargs)
    resumed = HistoryRecorder(model, tmp_path / "h", resume=True, **kwargs)
    assert resumed.next_step == 2
    norms += train_loop(model, resumed, tagger_micro_batch, steps=2)
    store = HistoryStore(tmp_path / "h")
    np.testing.assert_array_equal(np.unique(store.read("step")), np.arange(4))
    sequences = store.read("sequence")
    assert np.all(np.diff(sequences) >= 0) and sequences[-1] == 4 * ACCUM * BATCH - 1
    assert_exact(tmp_path / "h", norms)  # weights_start is the first run's


def test_commit_every(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.0"], commit_every=2,
                               targets_from=lambda args, kw: kw["targets"])
    gen, opt = torch.Generator().manual_seed(0), torch.optim.SGD(model.parameters(), lr=0.1)
    committed = []
    for _ in range(3):
        model(**tagger_micro_batch(gen))["loss"].backward()
        recorder.step(opt)
        opt.step()
        opt.zero_grad()
        committed.append(len(HistoryStore(tmp_path / "h")))
    rows = committed[1] // 2
    assert committed == [0, 2 * rows, 2 * rows]
    recorder.commit()
    assert len(HistoryStore(tmp_path / "h")) == 3 * rows
    recorder.close()


def test_resume_cuts_a_store_back_to_the_recorders_last_commit(tmp_path):
    """A process that dies after the store committed full shards on its own, but before the recorder's
    commit, leaves rows that may end inside a step: a resume drops them."""
    script = textwrap.dedent(f"""
        import os, torch
        from torch import nn
        from metaclm_ext.recording import HistoryRecorder
        model = nn.Sequential(nn.Linear(8, 4))
        recorder = HistoryRecorder(model, {str(tmp_path / "h")!r}, modules=["0"], commit_every=100, shard_rows=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            with recorder.capture(torch.zeros(2, 5, dtype=torch.long)):
                model(torch.randn(2, 5, 8)).sum().backward()
            recorder.step(opt)
            opt.step()
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert len(HistoryStore(tmp_path / "h")) == 16  # two shards of 8 of the 20 rows
    resumed = HistoryRecorder(nn.Sequential(nn.Linear(8, 4)), tmp_path / "h", modules=["0"], resume=True)
    assert resumed.next_step == 0 and len(resumed.writer) == 0
    resumed.close()
    assert len(HistoryStore(tmp_path / "h")) == 0


# --------------------------------------------------------------------------------------------------
# Exactness: transformers.Trainer


class MicroBatchData(torch.utils.data.Dataset):
    """The sequences of ``make_batch``'s micro-batches, one item per sequence, for the Trainer to batch."""

    def __init__(self, make_batch, n=BATCH * ACCUM * STEPS):
        gen = torch.Generator().manual_seed(2)
        self.items = []
        for _ in range(n // BATCH):
            batch = make_batch(gen)
            self.items += [{k: v[i] for k, v in batch.items()} for i in range(BATCH)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train_trainer(model, recorder, data, tmp_path, optim="sgd", callbacks=(), **options):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=LR, optim=optim,
                             max_grad_norm=MAX_NORM, lr_scheduler_type="linear", logging_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                             **{"save_strategy": "no", **options})
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[HistoryCallback(recorder), *callbacks])
    trainer.train()
    assert recorder.closed
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


@pytest.mark.parametrize("arch", sorted(LMS))
def test_preset_lm_trainer_is_exact(tmp_path, arch):
    torch.manual_seed(0)
    model = LMS[arch]()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=arch, dtype="float32")
    norms = train_trainer(model, recorder, MicroBatchData(lm_micro_batch), tmp_path)
    assert len(norms) == STEPS
    assert_exact(tmp_path / "h", norms)
    store = HistoryStore(tmp_path / "h")
    assert len(store) == STEPS * ACCUM * (SEQ - 1 + SEQ - 3)
    np.testing.assert_array_equal(np.unique(store.read("step")), np.arange(STEPS))


def test_pattern_sequential_trainer_is_exact(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=TAGGER_MODULES, dtype="float32",
                               targets_from=lambda args, kwargs: kwargs["targets"])
    norms = train_trainer(model, recorder, MicroBatchData(tagger_micro_batch), tmp_path)
    assert_exact(tmp_path / "h", norms)


def test_trainer_commits_before_every_checkpoint(tmp_path):
    class StoreRowsAtSave(TrainerCallback):
        def __init__(self):
            self.rows = []

        def on_save(self, args, state, control, **kwargs):
            self.rows.append((state.global_step, len(HistoryStore(tmp_path / "h"))))

    torch.manual_seed(0)
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.0"], commit_every=100,
                               targets_from=lambda args, kwargs: kwargs["targets"])
    at_save = StoreRowsAtSave()
    train_trainer(model, recorder, MicroBatchData(tagger_micro_batch), tmp_path, callbacks=[at_save],
                  save_strategy="steps", save_steps=2)
    steps = HistoryStore(tmp_path / "h").read("step")
    assert at_save.rows == [(2, int((steps < 2).sum())), (3, len(steps))]


def test_adamw_trainer_is_marked_not_exact(tmp_path):
    torch.manual_seed(0)
    model = llama()
    recorder = HistoryRecorder(model, tmp_path / "h", modules="llama", dtype="float32")
    train_trainer(model, recorder, MicroBatchData(lm_micro_batch), tmp_path, optim="adamw_torch")
    report = dualcheck_store(tmp_path / "h")
    assert report["exact"] is False and report["passed"] is None
    assert any("AdamW" in r for r in report["reasons"])


# --------------------------------------------------------------------------------------------------
# Bad input


def test_selector_matching_nothing():
    with pytest.raises(ValueError, match="'nope.\\*' matches no module"):
        select_modules(Tagger(), "nope.*")
    with pytest.raises(ValueError, match="gemma3, gpt2, llama"):  # an unknown preset is a pattern: presets listed
        select_modules(Tagger(), "bert")
    with pytest.raises(ValueError, match="preset 'llama' matches no module"):
        select_modules(Tagger(), "llama")
    with pytest.raises(TypeError, match="preset name"):
        select_modules(Tagger(), [])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_modules(Tagger(), "re:(")


def test_module_that_is_not_linear():
    with pytest.raises(TypeError, match="'net.1' is a Tanh, not a torch.nn.Linear"):
        select_modules(Tagger(), ["net.0", "net.1"])


def test_step_without_backward(tmp_path):
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.0"], targets_from=lambda a, kw: kw["targets"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="no backward since the last step"):
        recorder.step(opt)
    model(**tagger_micro_batch(torch.Generator().manual_seed(0)))  # a forward alone is not a step either
    with pytest.raises(RuntimeError, match="no backward since the last step"):
        recorder.step(opt)
    recorder.close()


def test_store_with_different_fields(tmp_path):
    model = Tagger()
    HistoryRecorder(model, tmp_path / "h", modules=["net.0"]).close()
    with pytest.raises(ValueError, match="resume with the same modules"):
        HistoryRecorder(model, tmp_path / "h", modules=["net.0", "net.2"], resume=True)
    with pytest.raises(ValueError, match="resume with the same modules"):
        HistoryRecorder(model, tmp_path / "h", modules=["net.0"], dtype="float32", resume=True)


def test_metadata_of_the_wrong_length(tmp_path):
    model = Tagger()
    recorder = HistoryRecorder(model, tmp_path / "h", modules=["net.0"], columns={"doc": "int64"})
    batch = tagger_micro_batch(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="metadata column 'doc' has shape \\[3\\]"):
        with recorder.capture(batch["targets"], metadata={"doc": torch.arange(3)}):
            model(**batch)
    with pytest.raises(ValueError, match="missing \\['doc'\\]"):
        with recorder.capture(batch["targets"]):
            model(**batch)
    with pytest.raises(TypeError, match="metadata column 'doc' must hold integers"):
        with recorder.capture(batch["targets"], metadata={"doc": torch.zeros(BATCH)}):
            model(**batch)
    recorder.close()


def test_shards_are_sized_by_bytes(tmp_path):
    wide = nn.Sequential(nn.Linear(1024, 1024))
    row_bytes = 2 * 1024 * 2 + 8 * 6  # input and error fields in float16, six int64 columns
    for model, modules, rows in ((wide, ["0"], (64 << 20) // row_bytes), (Tagger(), ["net.0"], 65536)):
        with HistoryRecorder(model, tmp_path / modules[0], modules=modules):
            pass
        assert HistoryStore(tmp_path / modules[0]).shard_rows == rows


def test_other_bad_input(tmp_path):
    model = Tagger()
    with pytest.raises(ValueError, match="dtype must be one of"):
        HistoryRecorder(model, tmp_path / "a", modules=["net.0"], dtype="int8")
    with pytest.raises(ValueError, match="recorded anyway"):
        HistoryRecorder(model, tmp_path / "b", modules=["net.0"], columns={"step": "int64"})
    model.net[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        HistoryRecorder(model, tmp_path / "c", modules=["net.0"])
    model.net[0].weight.requires_grad_(True)
    recorder = HistoryRecorder(model, tmp_path / "d", modules=["net.0"])
    batch = tagger_micro_batch(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="a training forward without targets"):
        model(**batch)
    with pytest.raises(ValueError, match="saw 16 positions but the targets cover 2 x 3"):
        with recorder.capture(batch["targets"][:, :3]):
            model(**batch)
    with pytest.raises(ValueError, match="targets must be token ids"):
        with recorder.capture(batch["targets"] - 200):
            model(**batch)
    with pytest.raises(RuntimeError, match="already active"):
        with recorder.capture(batch["targets"]):
            with recorder.capture(batch["targets"]):
                pass
    recorder.close()
    with pytest.raises(ValueError, match="is closed"):
        recorder.step(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="max_queries"):
        dualcheck_store(tmp_path / "d", max_queries=0)
