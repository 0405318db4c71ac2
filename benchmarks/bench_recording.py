"""pytest-benchmark: one fine-tuning step of a LLaMA-architecture LM with and without a HistoryRecorder.

The recorder records every layer's ``o_proj`` and ``down_proj`` inputs and errors (the "llama" preset)
into a float16 store, committing each step. ``METACLM_BENCH_RECORDING=smollm2`` runs SmolLM2-135M's
configuration (30 layers, 576 wide, randomly initialised: the step's arithmetic does not depend on the
weights) on one sequence of 256 tokens, the issue's measurement; the default is a smoke size that CI
runs so that the benchmark cannot rot. The last test prints the recording's overhead (mean step time
with the recorder / without - 1).
"""
import os

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from metaclm_ext.recording import HistoryRecorder

transformers.logging.set_verbosity_error()

CONFIGS = {
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3),
}
SIZE = os.environ.get("METACLM_BENCH_RECORDING", "smoke")
TOKENS = 256
MEANS = {}  # recording on/off -> mean step seconds, printed by the summary test


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIGS[SIZE], tie_word_embeddings=True, max_position_embeddings=TOKENS))
    ids = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.mark.benchmark(group=f"fine-tuning step ({SIZE})")
@pytest.mark.parametrize("recording", [False, True], ids=["plain", "recorded"])
def test_training_step(benchmark, model_and_batch, recording, tmp_path):
    model, ids = model_and_batch
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    recorder = HistoryRecorder(model, tmp_path / "history", modules="llama") if recording else None

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if recorder is not None:
            recorder.step(optimizer)
        optimizer.step()
        optimizer.zero_grad()

    try:
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    finally:
        if recorder is not None:
            recorder.close()
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        MEANS[recording] = benchmark.stats.stats.mean


def test_print_overhead():
    if len(MEANS) == 2:
        print(f"\nrecording overhead ({SIZE}): {MEANS[True] / MEANS[False] - 1:+.1%} "
              f"({MEANS[False]:.3f} s -> {MEANS[True]:.3f} s per step)")
