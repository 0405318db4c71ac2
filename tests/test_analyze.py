"""metaclm analyze: attention over the history, clustering, inner loss, norms and the claim verdicts."""
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import reshard_store, torchrun_cli

from metaclm_ext import data
from metaclm_ext.analyze import attention, claims, clustering
from metaclm_ext.analyze.forward import forward_split, lens_model, query_positions
from metaclm_ext.analyze.run import AnalyzeConfig, analyze_run
from metaclm_ext.cli import main
from metaclm_ext.training import epoch_limits
from metaclm_ext.training.history import LABEL_COLUMNS, STORE_COLUMNS as COLUMNS
from metaclm_ext.reference import history_topk_reference
from metaclm_ext.store import HistoryStore, HistoryWriter
from metaclm_ext.training import evaluate, load_checkpoint, load_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("analyze") / "tiny"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--record-history", "--no-progress"]) == 0
    return run


@pytest.fixture(scope="module")
def analysis(tiny_run):
    return analyze_run(tiny_run, AnalyzeConfig(), progress=False)


# --- the query token and the forward pass -------------------------------------------------------------

def test_query_is_the_last_letter_with_a_letter_next():
    rows = [{"id": 0, "seed": 0, "text": "abcdefgh"}, {"id": 1, "seed": 1, "text": "zyxwvutsrq"}]
    pos = query_positions(rows)
    for r, p in zip(rows, pos.tolist()):
        ids = data.encode(r["text"])
        assert ids[p] == data.encode(r["text"][-2])[1]          # the token is the second-to-last letter
        assert ids[p + 1] == data.encode(r["text"][-1])[1]      # its next token is the last letter, not <eos>


def test_forward_states_match_the_model(tiny_run):
    run = load_run(tiny_run)
    model = load_checkpoint(tiny_run)
    rows = run.data["validation"][:5]
    stats = forward_split(lens_model(model), rows, batch_size=2)
    from metaclm_ext.training import make_batch

    b = make_batch(rows)
    with torch.no_grad():
        hidden = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states
    pos = query_positions(rows)
    at = torch.arange(len(rows))
    for s in range(len(hidden) - 1):  # transformers' last hidden state is ln_f(output); ours is the raw output
        torch.testing.assert_close(stats.query_states[:, s], hidden[s][at, pos], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.transformer.ln_f(stats.query_states[:, -1]), hidden[-1][at, pos],
                               rtol=1e-5, atol=1e-5)
    assert stats.norms.shape == (sum(len(r["text"]) + 1 for r in rows), len(hidden))
    assert bool((stats.next_token >= 2).all()), "a query's next token must be a letter"
    assert set(stats.cproj_inputs) == {f"{k}_in.{l}" for k in ("attn", "mlp") for l in range(6)}
    assert stats.cproj_inputs["mlp_in.0"].shape == (5, 128)


def test_inner_loss_of_the_last_layer_is_the_model_loss(tiny_run, analysis):
    run = load_run(tiny_run)
    assert analysis["epochs"] == run.epochs == [0, 1, 2, 3]
    for i, epoch in enumerate(run.epochs):
        want = run.losses["validation"][epoch - 1] if epoch else evaluate(load_checkpoint(tiny_run, 0),
                                                                         run.data["validation"], torch.device("cpu"))
        assert analysis["inner_loss"]["validation"][i][-1] == pytest.approx(want, rel=1e-5)
        assert len(analysis["inner_loss"]["train"][i]) == 7


# --- attention over the history -------------------------------------------------------------------

def _hand_store(path, heads=2):
    """Epoch 1: 12 rows of seed 0 pointing along dims 0..; epochs 2-3: 12 rows each of seeds 0 and 1, seed 1
    pointing along its own dims. A seed-1 query at epoch 1 can only find seed-0 rows (all score 0)."""
    width = 4 * heads
    rows, seeds, epochs = [], [], []
    for epoch, seed_list in ((1, [0] * 12), (2, [0, 1] * 12), (3, [0, 1] * 12)):
        for s in seed_list:
            v = torch.zeros(width)
            v[s::4] = 1.0 + 0.01 * len(rows)  # seed s lives on dims s, s+4, ... (every head); later rows score higher
            rows.append(v)
            seeds.append(s)
            epochs.append(epoch)
    n = len(rows)
    cols = {c: np.zeros(n, dtype=np.int64) for c in COLUMNS}
    cols.update(seed=np.array(seeds), epoch=np.array(epochs), target=np.array(seeds) + 2,
                seed_next_token=np.array(seeds) * 28 + np.array(seeds) + 2)
    with HistoryWriter.create(path, {"attn_in.0": (width, "float32")}, {c: "int64" for c in COLUMNS}) as w:
        w.append({"attn_in.0": torch.stack(rows), **cols})
    return HistoryStore(path)


def test_history_attention_respects_each_checkpoints_history(tmp_path):
    store = _hand_store(tmp_path / "h")
    limits_by_epoch = epoch_limits(store.read("epoch"), [1, 2, 3])
    assert limits_by_epoch == {1: 12, 2: 36, 3: 60}
    q = torch.zeros(2, 8)
    q[1, 1::4] = 1.0                       # query 1 is seed 1; query 0 (all zeros) scores everything 0
    q[0, 0::4] = 1.0                       # query 0 is seed 0
    queries = q.repeat(3, 1)               # the same two queries at epochs 1, 2, 3
    groups = np.repeat(np.arange(3), 2)
    limits = np.repeat([12, 36, 60], 2)
    labels = attention.query_labels(torch.tensor([0, 1] * 3), torch.tensor([2, 3] * 3), 28)
    res = attention.history_attention(store, {"attn_in.0": queries}, labels, limits, groups, 3, heads=2, k=5,
                                      progress=False)
    seed = res["fields"]["attn_in.0"]["seed"]
    # epoch 1: seed 0 finds seed-0 rows (100%), seed 1 finds only seed-0 rows (0%): 50% over both queries.
    # epochs 2-3: each query's top-5 are its own seed's rows (100%); last-5 are the other seed's (0%).
    assert seed["top"] == [50.0, 100.0, 100.0]
    assert seed["last"] == [50.0, 0.0, 0.0]
    want_chance = [100 * (12 / 12 + 0 / 12) / 2, 100 * (24 / 36 + 12 / 36) / 2, 100 * (36 / 60 + 24 / 60) / 2]
    assert res["chance"]["seed"] == pytest.approx(want_chance)


def test_same_label_percent_ignores_missing_rows():
    idx = torch.tensor([[[0, 1, -1]], [[2, -1, -1]]])              # [Q=2, H=1, k=3]
    got = attention.same_label_percent(idx, np.array([5, 6, 5]), np.array([5, 5]), np.array([0, 0]), 1)
    assert got.tolist() == [100.0 * 2 / 3]


def test_analysis_attention_matches_the_reference(tiny_run, analysis):
    """Recompute every field's percentages with the plain-PyTorch history_topk twin on the whole store."""
    run = load_run(tiny_run)
    store = HistoryStore(run.history)
    att = analysis["attention"]
    assert att["epochs"] == [1, 2, 3] and att["history_rows"] == len(store)
    epoch_col = store.read("epoch")
    assert att["limits"] == [int((epoch_col <= e).sum()) for e in (1, 2, 3)]
    hist_labels = {name: store.read(LABEL_COLUMNS[name]) for name in attention.LABELS}
    n_queries = len(run.data["validation"])
    for i, epoch in enumerate(att["epochs"]):
        stats = forward_split(lens_model(load_checkpoint(tiny_run, epoch)), run.data["validation"])
        labels = attention.query_labels(stats.seed, stats.next_token, 28)
        for field, per_label in att["fields"].items():
            heads = 8 if field.startswith("attn") else 1
            ref = history_topk_reference(stats.cproj_inputs[field], store.read_tensor(field), k=10,
                                         limit=att["limits"][i], heads=heads)
            one_row = 100.0 / (n_queries * heads * 10)   # a near-tie may flip at most one selected row
            for name in attention.LABELS:
                for side, sel in (("top", ref.top), ("last", ref.last)):
                    want = attention.same_label_percent(sel.indices, hist_labels[name], labels[name],
                                                        np.zeros(n_queries, dtype=np.int64), 1)[0]
                    assert abs(per_label[name][side][i] - want) <= one_row + 1e-9, (field, name, side, epoch)


# --- clustering ------------------------------------------------------------------------------------

def test_matched_f1_by_hand():
    assert clustering.matched_f1(np.array([0, 0, 1, 1, 2]), np.array([7, 7, 3, 3, 5])) == 1.0
    # table [[2, 0], [1, 1]]: label 0 <-> cluster 0 (F1 4/5), label 1 <-> cluster 1 (F1 2/3)
    assert clustering.matched_f1(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx((0.8 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="equal-length"):
        clustering.matched_f1(np.array([0, 1]), np.array([0]))


def test_cluster_scores_on_separated_and_on_random_points():
    gen = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    centres = gen.normal(size=(4, 16)) * 20
    good = clustering.cluster_scores(centres[labels] + gen.normal(size=(100, 16)), labels)
    assert good == {"k": 4, "f1": 1.0, "ari": pytest.approx(1.0), "ami": pytest.approx(1.0)}
    noise = clustering.cluster_scores(gen.normal(size=(100, 16)), labels)
    assert noise["ari"] < 0.1 and noise["ami"] < 0.1 and noise["f1"] < 0.6
    assert clustering.cluster_scores(gen.normal(size=(5, 3)), np.zeros(5, dtype=int))["f1"] is None


def test_chance_f1_is_a_permutation_null_that_random_points_do_not_beat():
    gen = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 30)
    noise = clustering.cluster_scores(gen.normal(size=(150, 8)), labels, chance=True)
    null = noise["f1_chance"]
    assert null["permutations"] == clustering.CHANCE_PERMUTATIONS and 1 / 5 < null["mean"] <= null["quantile"] < 1
    assert noise["f1"] <= null["quantile"]            # random points: not above chance
    centres = gen.normal(size=(5, 8)) * 20
    good = clustering.cluster_scores(centres[labels] + gen.normal(size=(150, 8)), labels, chance=True)
    assert good["f1"] == 1.0 > good["f1_chance"]["quantile"]
    assert "f1_chance" not in clustering.cluster_scores(gen.normal(size=(150, 8)), labels)
    with pytest.raises(ValueError, match="permutations must be >= 1"):
        clustering.chance_f1(labels, labels, permutations=0)


# --- claims ----------------------------------------------------------------------------------------

def test_verdict_rule_and_claim_texts():
    C = claims.Check
    assert claims.verdict([C("a", True), C("b", True)]) == claims.REPRODUCED
    assert claims.verdict([C("a", True), C("b", False)]) == claims.PARTLY
    assert claims.verdict([C("a", True), C("b", False), C("c", False)]) == claims.NOT
    assert claims.verdict([]) == claims.UNTESTED
    # context checks are never counted: they neither lift a failure nor make a claim tested
    assert claims.verdict([C("a", False), C("ctx", True, substantive=False)]) == claims.NOT
    assert claims.verdict([C("a", True), C("ctx", False, substantive=False)]) == claims.REPRODUCED
    assert claims.verdict([C("ctx", True, substantive=False)]) == claims.UNTESTED
    assert claims.paper_claim("Fig 6").startswith("Fig 6: pair- and sequence-level")
    assert claims.early_late([float(v) for v in range(1, 21)]) == (1.5, 19.5)   # tenths: 2 of 20 each
    assert claims.early_late([1.0, 2.0, 3.0]) == (1.0, 3.0)


def test_claim_checks_follow_the_numbers():
    rising = {"epochs": [1, 2, 3, 4], "outer_loss": {"train": [4.0, 3.0, 2.0, 1.0], "validation": [4.0, 3.5, 3.0, 2.5]},
              "inner_loss": {"train": [[5.0, 4.0, 3.0]] * 3 + [[3.0, 2.0, 1.0]]}}
    got = {c["id"]: c["verdict"] for c in claims.judge(rising)}
    assert got["outer_loss"] == got["inner_loss"] == claims.REPRODUCED
    assert got["attention"] == got["clustering"] == got["norms"] == claims.UNTESTED
    falling = {**rising, "outer_loss": {"train": [1.0, 2.0, 3.0, 4.0]}, "inner_loss": {"train": [[1.0, 2.0, 3.0]] * 4}}
    got = {c["id"]: c["verdict"] for c in claims.judge(falling)}
    assert got["outer_loss"] == got["inner_loss"] == claims.NOT


def _clustering_result(f1_last: float, chance_quantile: float) -> dict:
    """A one-checkpoint clustering result with one split: every label's F1 is 0.2 at the embeddings and
    ``f1_last`` at the last layer."""
    labels = ("seed", "next_token", "seed_next_token")
    scores = {"validation": {label: {"f1": [[0.2, f1_last]]} for label in labels}}
    null = {"validation": {label: {"mean": [0.2, chance_quantile - 0.05], "quantile": [0.25, chance_quantile]}
                           for label in labels}}
    return {"epochs": [5], "layers": 1,
            "clustering": {"scores": scores, "f1_chance": {"permutations": 100, "quantile": 0.95, "scores": null}}}


def test_clustering_above_chance_check_and_the_query_token_named():
    def above(result):
        return [c for c in claims.clustering_checks(result) if "chance" in c.what]
    passing, failing = above(_clustering_result(0.6, 0.4)), above(_clustering_result(0.35, 0.4))
    assert len(passing) == 3 and all(c.passed and c.substantive for c in passing)
    assert len(failing) == 3 and not any(c.passed for c in failing)
    assert "0.350 > chance 0.400" in failing[0].what and "100 label permutations" in failing[0].what
    checks = claims.clustering_checks(_clustering_result(0.6, 0.4))
    assert "L1 output of the second-to-last letter, before ln_f" in checks[0].what
    old = _clustering_result(0.6, 0.4)
    del old["clustering"]["f1_chance"]                      # an analysis.json written before the null existed
    assert not above(old)
    assert "no chance F1" in claims.judge(old, only={"clustering"})[0]["notes"][0]


def test_inner_loss_is_judged_from_layer_1_the_embedding_comparison_is_context():
    # Layers 1..3 rise: the tied-head embedding state (10 nats) is beaten anyway, which must not count.
    rising_layers = {"epochs": [1, 2], "inner_loss": {"train": [[3.3, 2.0, 2.5, 3.0], [10.0, 1.0, 1.5, 2.0]]}}
    checks = claims.inner_loss_checks(rising_layers)
    embeddings = [c for c in checks if "embeddings" in c.what]
    assert len(embeddings) == 1 and embeddings[0].passed and not embeddings[0].substantive
    assert claims.verdict(checks) == claims.NOT             # 1 of 3: only "the mean over layers 1..3 falls"
    assert not any(c.passed for c in checks if c.substantive and "across layers" in c.what)
    falling = {"epochs": [1, 2], "inner_loss": {"train": [[3.3, 3.3, 3.3, 3.3], [10.0, 2.0, 2.1, 1.0]]}}
    checks = claims.inner_loss_checks(falling)               # one step up, still a falling trend
    assert claims.verdict(checks) == claims.REPRODUCED
    assert "Spearman rho -0.50 <= -0.5" in next(c.what for c in checks if "Spearman" in c.what)
    assert claims.spearman_with_order([3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert claims.spearman_with_order([1.0, 1.0, 2.0]) == pytest.approx(np.sqrt(3) / 2)  # ties share a rank
    assert np.isnan(claims.spearman_with_order([1.0, 1.0]))


def _norm_rows(seq: list[float], pair: list[float], last_step: list[float]) -> list[dict]:
    return [{"with_last_layer": {"sequence_percent": s, "pair_percent": p, "pair_percent_by_step": [99.0, l],
                                 "null_sequence_percent": 100 / 64}} for s, p, l in zip(seq, pair, last_step)]


def test_figure_6_nulls_are_context_and_cannot_lift_a_failed_trend():
    # Far above both nulls from the start, and falling with training: the nulls pass, the claim does not.
    falling = {"epochs": [0, 1, 2], "norms": _norm_rows([80.0, 60.0, 40.0], [95.0, 90.0, 85.0], [90.0, 80.0, 70.0])}
    checks = claims.norm_checks(falling)
    context = [c for c in checks if not c.substantive]
    assert len(context) == 3 and all(c.passed for c in context)
    assert any("10 x the null" in c.what for c in context) and any("the null 50%" in c.what for c in context)
    assert claims.verdict(checks) == claims.NOT
    rising = {"epochs": [0, 1, 2], "norms": _norm_rows([20.0, 60.0, 90.0], [80.0, 90.0, 99.0], [60.0, 80.0, 95.0])}
    assert claims.verdict(claims.norm_checks(rising)) == claims.REPRODUCED


def test_tally_counts_substantive_checks_only():
    checks = [{"what": "a", "passed": True, "substantive": True}, {"what": "b", "passed": False, "substantive": True},
              {"what": "c", "passed": True, "substantive": False}, {"what": "old record", "passed": True}]
    assert claims.tally(checks) == "2 of 3 substantive checks passed"


def test_analysis_judges_every_claim(analysis):
    assert [c["figure"] for c in analysis["claims"]] == ["Fig 1/9", "Fig 2a/11a", "Fig 2b/11b", "Fig 3/10", "Fig 6"]
    for c in analysis["claims"]:
        assert c["verdict"] in (claims.REPRODUCED, claims.PARTLY, claims.NOT) and c["checks"]
    norms = analysis["norms"][-1]["with_last_layer"]
    assert norms["pairs"] == 6 and norms["null_sequence_percent"] == pytest.approx(100 / 64)
    chance = analysis["clustering"]["f1_chance"]
    assert chance["epoch"] == analysis["epochs"][-1] and chance["permutations"] == clustering.CHANCE_PERMUTATIONS
    for split, by_label in chance["scores"].items():
        for label, null in by_label.items():
            assert len(null["quantile"]) == analysis["layers"] + 1
            assert 0 < null["mean"][-1] <= null["quantile"][-1] < 1, (split, label)
    fig1 = analysis["claims"][0]["checks"]
    assert sum("> chance" in c["what"] for c in fig1) == 6  # 2 splits x 3 labels


# --- the command line ------------------------------------------------------------------------------

def test_cli_writes_json_figures_and_summary(tiny_run, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["analyze", str(tiny_run), "--out", str(out), "--every", "2", "--no-progress"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["epochs"] == [0, 2, 3]                     # every 2nd checkpoint and the last
    for name in ("attention_seed", "attention_seed_next_token", "attention_next_token", "clustering_f1",
                 "clustering_all", "inner_loss_train", "inner_loss_validation", "norms"):
        png = out / result["files"][name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    for figure in ("Fig 1/9", "Fig 2a/11a", "Fig 2b/11b", "Fig 3/10", "Fig 6"):
        assert f"**{figure}: " in summary
    assert "second-to-last letter" in summary and "ln_f" in summary
    printed = capsys.readouterr().out
    assert "Fig 3/10" in printed and "substantive checks passed)" in printed
    assert "substantive checks passed).** " in summary and "- context, not counted (" in summary


def test_torchrun_splits_the_history_and_writes_what_one_process_writes(tiny_run, analysis, tmp_path):
    """`torchrun --nproc-per-node 2 ... metaclm analyze`: the attention of 2 gloo ranks, each streaming its
    shards of the history, is the single process's; only rank 0 writes."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    reshard_store(load_run(run).history, shard_rows=128)
    out = tmp_path / "two-ranks"
    proc = torchrun_cli(2, ["analyze", run, "--parts", "attention", "--out", out, "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "analysis.json").read_text())
    assert result["attention"] == json.loads(json.dumps(analysis["attention"]))
    assert proc.stdout.count("wrote ") == 1


def test_cli_without_history(tmp_path, capsys):
    run = tmp_path / "nohist"
    assert main(["train", "--preset", "tiny", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    assert main(["analyze", str(run), "--no-progress"]) == 2
    assert "--record-history" in capsys.readouterr().err
    assert main(["analyze", str(run), "--parts", "inner_loss,norms", "--no-progress"]) == 0
    result = json.loads((run / "analysis" / "analysis.json").read_text())
    assert "attention" not in result and "clustering" not in result and len(result["norms"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0,99"], "no checkpoint for epochs [99]"),
    (["--epochs", ","], "--epochs names none"),
    (["--parts", "attention,colour"], "parts must be"),
    (["--k", "0"], "k must be >= 1"),
    (["--every", "0"], "every must be >= 1"),
])
def test_cli_bad_input(tiny_run, tmp_path, capsys, args, message):
    assert main(["analyze", str(tiny_run), "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_not_a_run(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "--no-progress"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_run_without_checkpoints(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "empty"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("history", "analysis"))
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    assert main(["analyze", str(run), "--parts", "norms", "--epochs", "1", "--no-progress"]) == 2
    assert "no checkpoints to analyse" in capsys.readouterr().err
