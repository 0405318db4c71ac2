"""FAISS datastore: history_topk agrees with exact FAISS search; save/load checks; kNN-LM arithmetic."""
import json

import numpy as np
import pytest
import torch

import metaclm_ext
from metaclm_ext import knn

pytest.importorskip("faiss", reason="the datastore is FAISS (absent on the GPU machines' image)")


def _clusters(gen, n=3000, dim=16, classes=5):
    centres = torch.randn(classes, dim, generator=gen) * 4
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + torch.randn(n, dim, generator=gen), labels


@pytest.mark.parametrize("n, dim, k", [(5000, 64, 10), (777, 128, 33), (300, 8, 1)])
def test_history_topk_matches_faiss_exact_ip(n, dim, k, gen):
    """Same neighbours as IndexFlatIP wherever the scores are distinct (gap > 1e-4 relative)."""
    history = torch.randn(n, dim, generator=gen)
    queries = torch.randn(20, dim, generator=gen)
    index = knn.build_index(history, {}, metric="ip", use_gpu=False)
    scores, ids = knn.search(index, queries, k + 1)
    ours = metaclm_ext.history_topk(queries, history, k)
    tol = 1e-4 * np.abs(scores).max()
    gap_prev = np.concatenate([np.full((20, 1), np.inf), scores[:, :-1] - scores[:, 1:]], 1)[:, :k]
    gap_next = (scores[:, :-1] - scores[:, 1:])[:, :k]
    distinct = (gap_prev > tol) & (gap_next > tol)
    assert distinct.mean() > 0.9
    assert np.array_equal(ours.top.indices[:, 0].numpy()[distinct], ids[:, :k][distinct])
    np.testing.assert_allclose(ours.top.values[:, 0].numpy(), scores[:, :k], rtol=1e-5, atol=1e-4)
    # last-k: FAISS needs a second search with negated queries.
    neg_scores, neg_ids = knn.search(index, -queries, k)
    np.testing.assert_allclose(ours.last.values[:, 0].numpy(), -neg_scores, rtol=1e-5, atol=1e-4)


def test_round_trip_and_sidecar_checks(tmp_path, gen):
    vectors, labels = _clusters(gen)
    built = knn.build_index(vectors, {"next_token": labels, "seed": labels % 2}, metric="l2", info={"layer": 3})
    prefix = str(tmp_path / "layer3")
    knn.save_index(built, prefix)
    loaded = knn.load_index(prefix)
    assert loaded.ntotal == 3000 and loaded.info["layer"] == 3 and loaded.info["metric"] == "l2"
    np.testing.assert_array_equal(loaded.labels["seed"], (labels % 2).numpy())
    q = vectors[:7]
    assert np.array_equal(knn.search(loaded, q, 5)[1], knn.search(built, q, 5)[1])

    # Labels from another index do not pass as this index's labels.
    other = knn.build_index(vectors[:100], {"next_token": labels[:100]})
    knn.save_index(other, str(tmp_path / "other"))
    (tmp_path / "layer3.labels.npz").write_bytes((tmp_path / "other.labels.npz").read_bytes())
    with pytest.raises(ValueError, match=r"layer3.labels.npz does not match its sidecar"):
        knn.load_index(prefix)
    (tmp_path / "other.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"other.json"):
        knn.load_index(str(tmp_path / "other"))


def test_ntotal_mismatch_is_caught(tmp_path, gen):
    vectors, labels = _clusters(gen, n=200)
    built = knn.build_index(vectors, {"y": labels})
    prefix = str(tmp_path / "x")
    knn.save_index(built, prefix)
    meta = json.loads((tmp_path / "x.json").read_text())
    meta["ntotal"] = 199
    (tmp_path / "x.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="index has 200 rows, sidecar says 199"):
        knn.load_index(prefix)


def test_streaming_build_equals_in_memory(gen):
    vectors, labels = _clusters(gen, n=1000)

    class Source:  # a minimal row source, as a HistoryStore field is
        shape, dtype, device = tuple(vectors.shape), vectors.dtype, torch.device("cpu")

        def iter_chunks(self, chunk_rows, stop):
            for s in range(0, stop, chunk_rows):
                yield s, vectors[s : min(stop, s + chunk_rows)]

    a = knn.build_index(Source(), {"y": labels}, chunk_rows=64)
    b = knn.build_index(vectors, {"y": labels})
    assert np.array_equal(knn.search(a, vectors[:9], 4)[1], knn.search(b, vectors[:9], 4)[1])


def test_ivfpq_recall_on_clusters(gen):
    vectors, labels = _clusters(gen, n=4000, dim=32, classes=8)
    index = knn.build_index(vectors, {"y": labels}, metric="l2", kind="ivfpq", nlist=16, pq_m=8, pq_bits=6)
    _, ids = knn.search(index, vectors[:200], 10)
    assert knn.neighbour_purity(index, ids, "y", labels[:200].numpy()) > 0.9


def test_knn_distribution_and_purity(gen):
    vectors, labels = _clusters(gen)
    index = knn.build_index(vectors, {"y": labels}, metric="l2")
    scores, ids = knn.search(index, vectors[:50], 8)
    weights = knn.neighbour_weights(index, scores, temperature=10.0)
    probs = knn.knn_distribution(index, ids, weights, "y", 5)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == labels[:50].numpy()).mean() > 0.95


def test_knn_lm_losses_endpoints():
    lm = torch.log_softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)), -1)
    knn_p = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(4)), -1)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    out = knn.knn_lm_losses(lm, knn_p, t, [0.0, 0.5, 1.0])
    assert out[0.0] == pytest.approx(float(-lm.gather(1, t[:, None]).mean()))
    assert out[1.0] == pytest.approx(float(-knn_p.log().gather(1, t[:, None]).mean()))
    mix = (0.5 * knn_p + 0.5 * lm.exp()).log().gather(1, t[:, None]).mean()
    assert out[0.5] == pytest.approx(float(-mix))
    with pytest.raises(ValueError, match="lambda must be in"):
        knn.knn_lm_losses(lm, knn_p, t, [1.5])


def test_bad_arguments(gen):
    vectors, labels = _clusters(gen, n=100)
    with pytest.raises(ValueError, match="metric must be one of"):
        knn.build_index(vectors, {}, metric="cos")
    with pytest.raises(ValueError, match=r"labels\['y'\] has shape \[99\], expected \[100\]"):
        knn.build_index(vectors, {"y": labels[:99]})
    index = knn.build_index(vectors, {"y": labels})
    with pytest.raises(ValueError, match=r"k must be in \[1, 100\]"):
        knn.search(index, vectors[:2], 101)
    with pytest.raises(ValueError, match=r"queries must be \[Q, 16\]"):
        knn.search(index, vectors[:2, :8], 3)


def test_knn_cli_on_a_tiny_run(tmp_path):
    """`metaclm knn RUN` end to end: per-layer indexes saved and reloadable, a report whose numbers are
    consistent with the model (λ = 0 is the model's own loss) and with a direct kNN recomputation."""
    from metaclm_ext.cli import main
    from metaclm_ext.training import load_checkpoint, load_run

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0
    assert main(["knn", str(run), "--k", "4", "--lambdas", "0,0.5,1"]) == 0
    report = json.loads((run / "knn" / "knn.json").read_text())
    model = load_checkpoint(run)
    assert len(report["layers"]) == model.config.n_layer + 1
    assert (run / "knn" / "knn.png").stat().st_size > 0 and "kNN-LM" in (run / "knn" / "summary.md").read_text()
    for layer in report["layers"]:
        assert layer["knn_lm_loss"]["0.0"] == pytest.approx(report["model_loss"])
        assert 0 <= layer["knn_accuracy"] <= 1 and 0 <= layer["seed_purity"] <= 1

    # Recompute the last layer's kNN accuracy directly from its saved index.
    last = len(report["layers"]) - 1
    index = knn.load_index(str(run / "knn" / f"layer{last}"))
    val = knn.layer_representations(model, load_run(run).data["validation"])
    assert index.ntotal == report["train_tokens"]
    scores, ids = knn.search(index, val["layers"][last], 4)
    probs = knn.knn_distribution(index, ids, knn.neighbour_weights(index, scores), "next_token", 28)
    acc = float((probs.argmax(1) == val["next_token"].numpy()).mean())
    assert acc == pytest.approx(report["layers"][last]["knn_accuracy"])

    assert main(["knn", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_finite_and_positive(gen, temperature):
    vectors, labels = _clusters(gen, n=40)
    index = knn.build_index(vectors, {"y": labels})
    scores, _ = knn.search(index, vectors[:3], 4)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        knn.neighbour_weights(index, scores, temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        knn.evaluate_run("no-such-run", temperature=temperature)  # checked before any work


@pytest.mark.parametrize("flags, match", [(["--temperature", "0"], "temperature"), (["--k", "0"], "k must be"),
                                          (["--lambdas", "0,2"], "lambdas"), (["--lambdas", "a"], "--lambdas")])
def test_knn_cli_rejects_bad_numbers_with_exit_2(tmp_path, capsys, flags, match):
    from metaclm_ext.cli import main

    assert main(["knn", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaclm knn: error:") and match in err


def test_negative_or_too_large_labels_are_an_error_not_the_last_class(gen):
    vectors, _ = _clusters(gen, n=40)
    for bad in (-1, 3):
        index = knn.build_index(vectors, {"y": np.full(40, bad)})
        scores, ids = knn.search(index, vectors[:2], 3)
        with pytest.raises(ValueError, match=rf"labels\['y'\] of row \d+ is {bad}, outside \[0, num_classes = 3\)"):
            knn.knn_distribution(index, ids, knn.neighbour_weights(index, scores), "y", 3)


def _saved(gen, tmp_path):
    vectors, labels = _clusters(gen, n=40)
    prefix = str(tmp_path / "idx")
    knn.save_index(knn.build_index(vectors, {"y": labels}), prefix)
    return prefix, vectors


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(dim=m["dim"] + 1), "sidecar says"),
    (lambda m: m.pop("ntotal"), "'ntotal' must be a int"),
    (lambda m: m.update(metric="cos"), "metric 'cos'"),
    (lambda m: m.update(dim="16"), "'dim' must be a int"),
])
def test_a_sidecar_that_disagrees_with_its_index_is_a_value_error(gen, tmp_path, edit, match):
    prefix, vectors = _saved(gen, tmp_path)
    meta = json.loads(open(prefix + ".json").read())
    edit(meta)
    with open(prefix + ".json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=match):
        knn.load_index(prefix, use_gpu=False)


def test_a_query_of_the_wrong_width_is_a_value_error_even_with_a_wrong_info(gen, tmp_path):
    prefix, vectors = _saved(gen, tmp_path)
    index = knn.load_index(prefix, use_gpu=False)
    index.info["dim"] = 8  # FAISS itself asserts on a width other than its own
    with pytest.raises(ValueError, match=r"queries must be \[Q, 16\]"):
        knn.search(index, vectors[:2, :8], 3)
