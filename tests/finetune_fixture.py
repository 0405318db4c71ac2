"""A tiny fine-tuning run folder in the layout of `metaclm finetune`, for the tests of what reads one.

RUN/finetune.json (model, corpus, settings, tokens, rows, checkpoints with their step and history_rows),
RUN/history/ (a HistoryRecorder store of every layer's o_proj / down_proj inputs and errors, with an
``article`` column), RUN/checkpoints/step_XXXXXX/ (model + tokenizer, the last one final) and
RUN/articles.json ({"label", "articles": {id: {"title", "heldout"}}}). The model is a random 2-layer LLaMA (hidden 32, 4 heads), the
tokenizer the tiny BPE of tests/probe_models.py, the articles its sentences, two to an article; the last
sentence of each article is held out of training, so it can be attributed as unseen text.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from metaclm_ext.recording import HistoryRecorder, targets_from_labels
from probe_models import SENTENCES, tokenizer

CONTEXT = 64  # the model's max_position_embeddings: a longer text is rejected
SEQUENCE = 8  # training tokens per sequence
LR = 0.5
STEPS = 3
CHECKPOINT_STEPS = (0, 1, STEPS)  # checkpoints saved after this many optimizer steps (0: the start)
TITLES = {0: "Foxes and models", 1: "School roads", 2: "Committees"}
ARTICLES = {0: SENTENCES[0:2], 1: SENTENCES[3:5], 2: SENTENCES[5:6] + SENTENCES[2:3]}
HELD_OUT = {0: SENTENCES[1], 1: SENTENCES[4], 2: SENTENCES[2]}  # the last sentence of each article


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def training_sequences(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [S, SEQUENCE], article [S]): each article's training sentences cut into full sequences."""
    ids, articles = [], []
    for article, sentences in ARTICLES.items():
        tokens = tok(" ".join(s for s in sentences if s != HELD_OUT[article]))["input_ids"]
        for start in range(0, len(tokens) - SEQUENCE + 1, SEQUENCE):
            ids.append(tokens[start : start + SEQUENCE])
            articles.append(article)
    return torch.tensor(ids), torch.tensor(articles)


def save_checkpoint(run: Path, model, tok, step: int, rows: int) -> dict:
    """Save the model and tokenizer after ``step`` steps; returns its finetune.json entry."""
    folder = run / "checkpoints" / checkpoint_name(step)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"step": step, "path": str(folder.relative_to(run)), "history_rows": rows}


def make_run(run: Path, dtype: str = "float16") -> Path:
    """Fine-tune the tiny model for STEPS plain-SGD steps (two micro-batches each), recording every layer;
    returns ``run``."""
    run = Path(run)
    torch.manual_seed(0)
    tok = tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=1,
                                         pad_token_id=0))
    ids, articles = training_sequences(tok)
    recorder = HistoryRecorder(model, run / "history", modules="llama", dtype=dtype, columns={"article": "int64"})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    order = torch.randperm(len(ids))
    checkpoints = [save_checkpoint(run, model, tok, 0, 0)]
    for step in range(STEPS):
        batch = order[(step * 4 + torch.arange(4)) % len(ids)]
        for micro in batch.split(2):
            with recorder.capture(targets=targets_from_labels(ids[micro]), metadata={"article": articles[micro]}):
                (model(input_ids=ids[micro], labels=ids[micro]).loss / 2).backward()
        recorder.step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 in CHECKPOINT_STEPS:
            checkpoints.append(save_checkpoint(run, model, tok, step + 1, recorder.writer.rows))
    recorder.close()
    rows = checkpoints[-1]["history_rows"]
    (run / "finetune.json").write_text(json.dumps({
        "model": {"spec": "tiny-llama", "description": "random 2-layer LLaMA (hidden 32, 4 heads), tiny BPE"},
        "corpus": {"spec": "fixture", "description": "tests/probe_models.py sentences, two per article"},
        "settings": {"optimizer": "SGD", "lr": LR, "steps": STEPS, "sequence": SEQUENCE},
        "tokens": rows, "rows": rows, "checkpoints": checkpoints}, indent=1))
    (run / "articles.json").write_text(json.dumps({"label": "article", "articles": {
        str(k): {"title": title, "heldout": [HELD_OUT[k]]} for k, title in TITLES.items()}}))
    return run
