"""Table 1 explained (probe/norm_drops*.py): synthetic states with a planted massive dimension, every number
against a plain reference written out here, bad input, and the pipeline on tiny random GPT-2/LLaMA/Gemma3 models."""
import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded at run time

import pytest
import torch

import probe_models
from metaclm_ext.cli import main
from metaclm_ext.probe import norm_drops
from metaclm_ext.probe.models import load_model
from metaclm_ext.probe.norm_drops_run import block_states, run_norm_drops
from metaclm_ext.probe.run import ProbeConfig, run_probe

MASSIVE = 3          # the planted dimension
DROP_STEP = 2        # the step (state 2 -> 3) where the block's MLP wipes it out


def planted(n=40, s=6, d=16, seed=0):
    """Tokens whose other dimensions grow 10 % a state while dimension MASSIVE holds 10 up to state DROP_STEP and
    1 after it: the full norm drops at that step for every token, the norm without MASSIVE never drops. The
    residual after attention equals the state before the block (the MLP makes the whole change)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, d, generator=g, dtype=torch.float64)
    states = base * (1 + 0.1 * torch.arange(s, dtype=torch.float64))[None, :, None]
    states[:, :, MASSIVE] = torch.where(torch.arange(s) <= DROP_STEP, 10.0, 1.0)
    return states.float(), states.float().norm(dim=-1)[:, :-1]


def random_states(n=30, s=7, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.05 * torch.randn(n, s, 1, generator=g).cumsum(1))  # norms that mostly drift up and down
    return torch.randn(n, s, d, generator=g) * scale


# --- the planted massive dimension ---------------------------------------------------------------------------

def test_finds_the_planted_dimension_and_its_step():
    states, after_attention = planted()
    got = norm_drops.explain(states, after_attention)
    assert got["dominant_dims"]["ranking"][0]["dim"] == MASSIVE
    assert all(row[0]["dim"] == MASSIVE for row in got["dominant_dims"]["per_state"][: DROP_STEP + 1])
    assert got["pair_percent_by_step"][DROP_STEP] == 0.0
    worst = got["worst_steps"][0]
    assert (worst["from_state"], worst["to_state"]) == (DROP_STEP, DROP_STEP + 1)
    assert worst["cause"] == "mlp" and worst["attention_nondecreasing_percent"] == 100.0
    assert worst["mlp_nondecreasing_percent"] == 0.0 and worst["dropping_tokens"] == 40
    assert worst["mean_attention_change_percent"] == 0.0 and worst["mean_mlp_change_percent"] < 0
    # The massive dimension loses more than the whole norm does: the others grow.
    assert MASSIVE in worst["attributed_dims"] and worst["drop_share_in_attributed_dims_percent"] > 100


def test_removing_the_planted_dimension_restores_monotone_norms():
    states, after_attention = planted()
    removal = {r["removed"]: r for r in norm_drops.explain(states, after_attention)["removal"]}
    assert removal[0]["dims"] == [] and removal[0]["sequence_percent"] == 0.0
    assert removal[1]["dims"] == [MASSIVE]
    assert removal[1]["sequence_percent"] == removal[1]["pair_percent"] == 100.0
    assert removal[1]["pair_percent_by_step"] == [100.0] * 5


def test_attention_is_named_when_attention_drops_the_norm():
    states, _ = planted()
    after_attention = states.norm(dim=-1)[:, 1:].clone()
    after_attention[:, DROP_STEP] = 0.5 * states[:, DROP_STEP + 1].norm(dim=-1)  # attention halves, the MLP restores
    worst = norm_drops.explain(states, after_attention)["worst_steps"][0]
    assert worst["cause"] == "attention" and worst["attention_nondecreasing_percent"] == 0.0
    assert worst["mlp_nondecreasing_percent"] == 100.0


# --- every number against a plain reference ----------------------------------------------------------------

def test_shares_equal_a_reference_written_out():
    states = random_states()
    n, s, d = states.shape
    shares = norm_drops.dim_shares(states)
    for i in range(s):
        for j in range(d):
            ref = sum(float(states[t, i, j]) ** 2 / sum(float(v) ** 2 for v in states[t, i]) for t in range(n)) / n
            assert shares[i, j].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    dims = norm_drops.dominant_dims(states, top=3)
    mean = [sum(shares[i, j].item() for i in range(s)) / s for j in range(d)]
    assert [r["dim"] for r in dims["ranking"]] == sorted(range(d), key=lambda j: -mean[j])[:3]
    assert dims["ranking"][0]["share_percent_by_state"] == pytest.approx(
        [100 * shares[i, dims["ranking"][0]["dim"]].item() for i in range(s)])
    assert [e["dim"] for e in dims["per_state"][2]] == sorted(range(d), key=lambda j: -shares[2, j].item())[:3]


def test_removal_equals_zeroing_the_dimensions():
    states = random_states()
    got = norm_drops.explain(states, states.norm(dim=-1)[:, :-1], removed=(0, 2, 3))
    for r in got["removal"]:
        zeroed = states.clone()
        zeroed[..., r["dims"]] = 0
        norms = zeroed.norm(dim=-1)
        rows = [[bool(norms[t, i + 1] >= norms[t, i]) for i in range(states.shape[1] - 1)] for t in range(len(norms))]
        assert r["sequence_percent"] == pytest.approx(100 * sum(all(row) for row in rows) / len(rows))
        assert r["pair_percent"] == pytest.approx(100 * sum(map(sum, rows)) / sum(map(len, rows)))
    assert got["removal"][1]["dims"] == [r["dim"] for r in norm_drops.dominant_dims(states, 2)["ranking"]]


def test_tolerance_equals_a_reference_and_never_falls_with_tau():
    norms = random_states().norm(dim=-1)
    taus = [0, 0.5, 1, 2, 5, 20]
    curve = norm_drops.tolerance_curve(norms, taus)
    for row, tau in zip(curve, taus):
        kept = [[float(b) >= (1 - tau / 100) * float(a) for a, b in zip(traj[:-1], traj[1:])] for traj in norms]
        assert row["tau_percent"] == tau
        assert row["sequence_percent"] == pytest.approx(100 * sum(all(k) for k in kept) / len(kept))
        assert row["pair_percent"] == pytest.approx(100 * sum(map(sum, kept)) / sum(map(len, kept)))
    for key in ("sequence_percent", "pair_percent"):
        assert all(a[key] <= b[key] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["sequence_percent"] > curve[0]["sequence_percent"]   # the drift really drops some norms


def test_sublayer_split_and_drop_share_equal_a_reference():
    before, mid, after = torch.tensor([4.0, 4.0, 2.0, 5.0]), torch.tensor([5.0, 3.0, 2.5, 5.0]), torch.tensor([3.0, 3.5, 2.0, 6.0])
    got = norm_drops.sublayer_split(before, mid, after)
    assert got["nondecreasing_percent"] == 50.0                   # tokens 2 (equal) and 3
    assert got["attention_nondecreasing_percent"] == 75.0         # all but token 1
    assert got["mlp_nondecreasing_percent"] == 50.0               # tokens 1 and 3
    assert got["dropping_tokens"] == 2                            # tokens 0 and 1
    assert got["mean_attention_change_percent"] == pytest.approx((25.0 - 25.0) / 2)
    assert got["mean_mlp_change_percent"] == pytest.approx((-50.0 + 12.5) / 2)
    assert got["cause"] == "mlp"
    x, y = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[1.0, 4.0, 1.0], [2.0, 0.0, 0.0]])
    # Only token 0 drops (25 -> 18): dimension 0 loses 8 of the 7 lost, dimension 2 gains 1.
    assert norm_drops.drop_share_in_dims(x, y, [0]) == pytest.approx(100 * 8 / 7)
    assert norm_drops.drop_share_in_dims(x, x, [0]) is None


# --- bad input ------------------------------------------------------------------------------------------

GOOD = torch.ones(3, 4, 5)


@pytest.mark.parametrize("states", [torch.ones(3, 4), torch.ones(3, 4, 5, dtype=torch.long), torch.ones(0, 4, 5),
                                    torch.ones(3, 1, 5), torch.full((3, 4, 5), float("nan")), torch.zeros(3, 4, 5),
                                    [[[1.0]]]])
def test_bad_states(states):
    with pytest.raises(ValueError, match="states"):
        norm_drops.explain(states, torch.ones(3, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"after_attention": torch.ones(3, 4)}, "after_attention"), ({"after_attention": None}, "after_attention"),
    ({"removed": (0, 5)}, "removed"), ({"removed": ()}, "removed"), ({"removed": (-1,)}, "removed"),
    ({"taus": (-1,)}, "taus"), ({"taus": ()}, "taus"), ({"taus": (float("nan"),)}, "taus"),
    ({"top": 0}, "top"), ({"top": 6}, "top"), ({"worst": 4}, "worst"), ({"worst": 1.5}, "worst"),
    ({"attributed": 0}, "attributed")])
def test_bad_arguments(kwargs, match):
    args = {"after_attention": torch.ones(3, 3), **kwargs}
    with pytest.raises(ValueError, match=match):
        norm_drops.explain(GOOD, **args)


def test_bad_dims_and_sublayer_norms():
    for dims in ([5], [1, 1], [-1], range(5)):
        with pytest.raises(ValueError, match="dims"):
            norm_drops.norms_without(GOOD, dims)
    with pytest.raises(ValueError, match="after_attention"):
        norm_drops.sublayer_split(torch.ones(3), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="after"):
        norm_drops.sublayer_split(torch.ones(3), torch.ones(3), -torch.ones(3))
    with pytest.raises(ValueError, match="zero norm"):
        norm_drops.sublayer_split(torch.zeros(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="before and after"):
        norm_drops.drop_share_in_dims(torch.ones(2, 3), torch.ones(3, 3), [0])


# --- the pipeline on tiny random models ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("norm_drops")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(probe_models.SENTENCES) + "\n")
    return str(corpus), {k: probe_models.save(k, root / k) for k in ("gpt2", "llama", "gemma3")}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
def test_after_attention_is_the_residual_the_mlp_adds_to(tiny, kind):
    """Each block's output = the captured residual + its MLP sublayer applied to it, written out per family."""
    lm = load_model(tiny[1][kind])
    ids = lm.tokenizer(probe_models.SENTENCES[0], return_tensors="pt")["input_ids"]
    states, mid = block_states(lm, ids, torch.ones_like(ids))
    assert mid.shape == (len(lm.layers), *states.shape[1:])
    for i, layer in enumerate(lm.layers):
        with torch.no_grad():
            if kind == "gpt2":
                out = mid[i] + layer.mlp(layer.ln_2(mid[i]))
            elif kind == "llama":
                out = mid[i] + layer.mlp(layer.post_attention_layernorm(mid[i]))
            else:
                out = mid[i] + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(mid[i])))
        assert torch.allclose(out, states[i + 1], atol=1e-5), (kind, i)
        assert not torch.allclose(mid[i], states[i], atol=1e-3)            # attention did change the stream


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_pipeline_takes_the_tokens_of_table1(tiny, kind):
    cfg = ProbeConfig(tiny[1][kind], tiny[0], max_samples=5, batch_size=2, pca_samples=2, linear_samples=2)
    got = run_norm_drops(cfg, progress=False)
    table1 = run_probe(cfg, progress=False)["norms"]["table1"]
    assert got["counts"]["studied_tokens_kept"] == table1["trajectories"] and got["states"] == got["model"]["layers"]
    assert got["removal"][0]["sequence_percent"] == table1["sequence_percent"]
    assert got["removal"][0]["pair_percent"] == table1["pair_percent"]
    assert got["pair_percent_by_step"] == table1["pair_percent_by_step"]
    assert got["tolerance"][0]["sequence_percent"] == table1["sequence_percent"]


def test_cli_explain_norms_writes_its_outputs(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["probe", "--model", tiny[1]["llama"], "--corpus", tiny[0], "--out", str(out), "--max-samples", "4",
                 "--pca-samples", "2", "--explain-norms"]) == 0
    assert "norm drops: worst step" in capsys.readouterr().out
    for name in ("norm_drops.json", "norm_drops.md", "norm_drops.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    written = json.loads((out / "norm_drops.json").read_text())
    probe = json.loads((out / "results.json").read_text())
    assert written["removal"][0]["sequence_percent"] == probe["norms"]["table1"]["sequence_percent"]
    text = (out / "norm_drops.md").read_text()
    assert "| 0 | none (Table 1) |" in text and "![norm drops" in text
    worst = written["worst_steps"][0]
    assert (f"The worst step, {worst['from_state']} -> {worst['to_state']}, keeps "
            f"{worst['nondecreasing_percent']:.1f}% of tokens") in text
    assert all(math.isfinite(r["pair_percent"]) for r in written["removal"])
