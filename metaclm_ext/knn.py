"""kNN over historical token representations: the LM head read as a nearest-neighbour vote.

Section 3 of arXiv 2310.05884 writes the LM head's logit for a token as a sum over the training
history (Eq. 4), i.e. a similarity-weighted vote of historical instances; Khandelwal et al. (2019,
kNN-LM) showed an explicit kNN over hidden states can match or beat the forward pass. This module
builds FAISS indexes over layer representations with their labels kept beside them, saves and reloads
them with a check that index and labels belong together, and scores kNN predictions and the kNN-LM
interpolation ``p = λ p_kNN + (1 - λ) p_LM``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .boundary import one_line
from .markdown import table
from .stream import source_chunks
from .training import IGNORE, load_checkpoint, load_run, make_batch

METRICS = ("ip", "l2")
KINDS = ("flat", "ivfpq")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a requirement
        raise ImportError("metaclm_ext.knn needs FAISS: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def gpu_available() -> bool:
    """True when this FAISS build sees a GPU (faiss-gpu on a CUDA machine)."""
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


@dataclass
class KnnIndex:
    """A FAISS index over N vectors plus int64 label arrays of length N (next token, seed, ...)."""

    index: object
    labels: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


def _as_float32(rows) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(rows, dtype=np.float32)


def _row_blocks(vectors, chunk_rows: int):
    """(offset, fp32 block) of a tensor, an array, or a row source with iter_chunks (a store field)."""
    if hasattr(vectors, "iter_chunks"):  # the ops' reader: checks the source covers every row in order
        for offset, rows in source_chunks(vectors, chunk_rows, vectors.shape[0]):
            yield offset, _as_float32(rows)
    else:
        for start in range(0, vectors.shape[0], chunk_rows):
            yield start, _as_float32(vectors[start : start + chunk_rows])


def build_index(
    vectors,
    labels: Mapping[str, np.ndarray],
    *,
    metric: str = "ip",
    kind: str = "flat",
    nlist: Optional[int] = None,
    pq_m: int = 8,
    pq_bits: int = 8,
    train_rows: int = 100_000,
    chunk_rows: int = 65_536,
    use_gpu: Optional[bool] = None,
    info: Optional[dict] = None,
) -> KnnIndex:
    """Index ``vectors`` ([N, D]: tensor, array or store field; streamed in chunks) with ``labels``.

    metric "ip" (exact inner product, the dual form's weighting factor) or "l2" (kNN-LM); kind "flat"
    (exact) or "ivfpq" (IVF with product quantisation, for large histories; trained on the first
    ``train_rows`` rows). ``use_gpu`` None means: on a GPU when FAISS sees one (flat indexes).
    """
    faiss = _faiss()
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(vectors.shape) != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [N, D] array, got shape {list(vectors.shape)}")
    n, dim = int(vectors.shape[0]), int(vectors.shape[1])
    labels = {name: np.asarray(v).astype(np.int64, copy=False) for name, v in labels.items()}
    for name, v in labels.items():
        if v.shape != (n,):
            raise ValueError(f"labels[{name!r}] has shape {list(v.shape)}, expected [{n}]")
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if kind == "flat":
        index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    else:
        if dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
        nlist = nlist or max(1, min(4096, int(4 * np.sqrt(n))))
        quantizer = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, pq_bits, faiss_metric)
        sample = np.concatenate([b for _, b in _row_blocks(_head(vectors, train_rows), chunk_rows)])
        if sample.shape[0] < max(nlist, 2**pq_bits):
            raise ValueError(f"ivfpq needs at least {max(nlist, 2**pq_bits)} training rows, got {sample.shape[0]}")
        index.train(sample)
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    if use_gpu and kind == "flat":
        index = faiss.index_cpu_to_all_gpus(index)
    for _, block in _row_blocks(vectors, chunk_rows):
        index.add(block)
    meta = {"metric": metric, "kind": kind, "dim": dim, "ntotal": n, "gpu": bool(use_gpu and kind == "flat")}
    meta.update(info or {})
    return KnnIndex(index, labels, meta)


def _head(vectors, rows: int):
    if hasattr(vectors, "iter_chunks"):
        return _Head(vectors, min(rows, vectors.shape[0]))
    return vectors[:rows]


class _Head:
    """The first rows of a row source, as a row source."""

    def __init__(self, source, rows):
        self.source, self.shape = source, (rows, source.shape[1])

    def iter_chunks(self, chunk_rows, stop):
        return self.source.iter_chunks(chunk_rows, min(stop, self.shape[0]))


def check_k(k, ntotal: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= ntotal:
        raise ValueError(f"k must be in [1, {ntotal}], got {k}")
    return int(k)


def check_temperature(temperature) -> float:
    """A softmax temperature: a finite number > 0 (0 divides by zero: NaN weights; inf makes every weight equal)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def search(knn: KnnIndex, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores or squared distances [Q, k], row ids [Q, k]) of the k nearest rows."""
    k = check_k(k, knn.ntotal)
    q = _as_float32(queries)
    dim = int(knn.index.d)  # the index's own width: FAISS asserts on any other
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [Q, {dim}], got {list(q.shape)}")
    return knn.index.search(q, k)


def neighbour_weights(knn: KnnIndex, scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax weights of the neighbours: over scores (ip) or negative squared distances (l2)."""
    temperature = check_temperature(temperature)
    logits = scores if knn.info["metric"] == "ip" else -scores
    logits = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return torch.softmax(logits, dim=-1).numpy()


def knn_distribution(knn: KnnIndex, ids: np.ndarray, weights: np.ndarray, label: str, num_classes: int) -> np.ndarray:
    """p_kNN [Q, num_classes]: neighbour weights summed per label of the neighbours (Eq. 4's vote).

    Every neighbour's label must be in [0, num_classes): a -1 would otherwise wrap round to the last class.
    """
    labels = knn.labels[label][ids]  # [Q, k]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        q, j = np.argwhere(bad)[0]
        raise ValueError(f"labels[{label!r}] of row {int(ids[q, j])} is {int(labels[q, j])}, outside [0, "
                         f"num_classes = {num_classes})")
    probs = np.zeros((ids.shape[0], num_classes))
    np.add.at(probs, (np.arange(ids.shape[0])[:, None], labels), weights)
    return probs


def neighbour_purity(knn: KnnIndex, ids: np.ndarray, label: str, query_labels: np.ndarray) -> float:
    """Fraction of neighbours that share the query's label (e.g. the same seed regex)."""
    return float((knn.labels[label][ids] == np.asarray(query_labels)[:, None]).mean())


def knn_lm_losses(lm_logprobs, knn_probs, targets, lambdas: Sequence[float]) -> dict:
    """Mean cross-entropy of λ p_kNN + (1-λ) p_LM for each λ, by log-sum-exp (kNN-LM, Eq. 2 there)."""
    lm = torch.as_tensor(lm_logprobs, dtype=torch.float64)
    knn = torch.as_tensor(knn_probs, dtype=torch.float64).clamp_min(0).log()
    t = torch.as_tensor(targets, dtype=torch.int64)[:, None]
    lm_t, knn_t = lm.gather(1, t)[:, 0], knn.gather(1, t)[:, 0]
    out = {}
    for lam in lambdas:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lam}")
        parts = []
        if lam > 0:
            parts.append(knn_t + np.log(lam))
        if lam < 1:
            parts.append(lm_t + np.log(1 - lam))
        out[float(lam)] = float(-torch.logsumexp(torch.stack(parts), dim=0).mean())
    return out


# --------------------------------------------------------------------------------------------------
# Saving: <prefix>.faiss (faiss.write_index), <prefix>.labels.npz, <prefix>.json (info + checksums).


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_index(knn: KnnIndex, prefix: str) -> None:
    faiss = _faiss()
    index = faiss.index_gpu_to_cpu(knn.index) if knn.info.get("gpu") else knn.index
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    faiss.write_index(index, prefix + ".faiss")
    np.savez(prefix + ".labels.npz", **knn.labels)
    meta = dict(knn.info, gpu=False, labels=sorted(knn.labels),
                index_sha256=_sha256(prefix + ".faiss"), labels_sha256=_sha256(prefix + ".labels.npz"))
    with open(prefix + ".json", "w") as f:
        json.dump(meta, f, indent=1)


def load_index(prefix: str, *, use_gpu: Optional[bool] = None) -> KnnIndex:
    """Reload a saved index, checking that the index, the labels and the sidecar belong together."""
    faiss = _faiss()
    for suffix in (".json", ".faiss", ".labels.npz"):
        if not os.path.exists(prefix + suffix):
            raise FileNotFoundError(f"kNN index file missing: {prefix + suffix}")
    try:
        with open(prefix + ".json") as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{prefix}.json is not valid JSON ({type(exc).__name__}: {exc})") from None
    _check_sidecar(meta, prefix + ".json")
    for suffix, key in ((".faiss", "index_sha256"), (".labels.npz", "labels_sha256")):
        if _sha256(prefix + suffix) != meta.get(key):
            raise ValueError(f"{prefix + suffix} does not match its sidecar {prefix}.json (checksum differs)")
    try:
        index = faiss.read_index(prefix + ".faiss")
    except RuntimeError as exc:  # FAISS's parser rejects the file
        raise ValueError(f"{prefix}.faiss is not a FAISS index FAISS can read ({one_line(exc)})") from None
    with np.load(prefix + ".labels.npz", allow_pickle=False) as z:
        labels = {name: z[name] for name in z.files}
    if index.ntotal != meta["ntotal"] or any(v.shape != (index.ntotal,) for v in labels.values()):
        raise ValueError(f"{prefix}: index has {index.ntotal} rows, sidecar says {meta['ntotal']}")
    if int(index.d) != meta["dim"]:
        raise ValueError(f"{prefix}: index vectors are {index.d}-wide, sidecar says {meta['dim']}")
    if any(not np.issubdtype(v.dtype, np.integer) for v in labels.values()):
        raise ValueError(f"{prefix}.labels.npz: labels must be integer arrays")
    if (use_gpu if use_gpu is not None else gpu_available()) and meta["kind"] == "flat":
        index = faiss.index_cpu_to_all_gpus(index)
        meta["gpu"] = True
    return KnnIndex(index, labels, meta)


def _check_sidecar(meta, path: str) -> None:
    """ValueError unless the sidecar JSON has the keys load_index reads, with their types."""
    want = {"metric": str, "kind": str, "dim": int, "ntotal": int, "index_sha256": str, "labels_sha256": str}
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    for key, kind in want.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"{path}: {key!r} must be a {kind.__name__}, got {meta.get(key)!r}")
    if meta["metric"] not in METRICS or meta["kind"] not in KINDS:
        raise ValueError(f"{path}: metric {meta['metric']!r} / kind {meta['kind']!r} not one of {METRICS} / {KINDS}")


# --------------------------------------------------------------------------------------------------
# `metaclm knn RUN`: per-layer kNN over the training tokens of a trained synthetic-language run.


@torch.no_grad()
def layer_representations(model, rows: list, batch_size: int = 64) -> dict:
    """Representations of every trained token (one with a next token) of ``rows``.

    Returns {"layers": [L+1] fp32 [T, D] (embedding output, then each block's output; the last one is
    the final-LayerNorm output that the LM head reads, as transformers returns it), "next_token",
    "seed": int64 [T], "lm_logprobs": fp32 [T, V]}.
    """
    layers, next_token, seeds, logprobs = None, [], [], []
    model.eval()
    for i in range(0, len(rows), batch_size):
        b = make_batch(rows[i : i + batch_size])
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        keep = b.labels != IGNORE
        if layers is None:
            layers = [[] for _ in out.hidden_states]
        for store, h in zip(layers, out.hidden_states):
            store.append(h[keep].float())
        next_token.append(b.labels[keep])
        seeds.append(b.seeds[:, None].expand_as(b.labels)[keep])
        logprobs.append(torch.log_softmax(out.logits[keep].float(), -1))
    return {"layers": [torch.cat(x) for x in layers], "next_token": torch.cat(next_token),
            "seed": torch.cat(seeds), "lm_logprobs": torch.cat(logprobs)}


def evaluate_run(run_dir, *, epoch=None, k: int = 16, metric: str = "l2", kind: str = "flat",
                 temperature: float = 1.0, lambdas=(0.0, 0.25, 0.5, 0.75, 1.0), out_dir=None,
                 progress: bool = True) -> dict:
    """Index each layer's training-token representations, query with the validation tokens."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    temperature = check_temperature(temperature)
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas or not all(0.0 <= lam <= 1.0 for lam in lambdas):
        raise ValueError(f"lambdas must be one or more numbers in [0, 1], got {lambdas}")
    if metric not in METRICS or kind not in KINDS:
        raise ValueError(f"metric must be one of {METRICS} and kind one of {KINDS}, got {metric!r}, {kind!r}")
    run = load_run(run_dir)
    model = load_checkpoint(run_dir, epoch)
    epoch = run.epochs[-1] if epoch is None else epoch
    train = layer_representations(model, run.data["train"])
    val = layer_representations(model, run.data["validation"])
    vocab = int(val["lm_logprobs"].shape[1])
    targets = val["next_token"].numpy()
    model_loss = float(-val["lm_logprobs"].gather(1, val["next_token"][:, None]).mean())
    out_dir = os.path.join(str(run_dir), "knn") if out_dir is None else str(out_dir)
    report = {"run": str(run_dir), "epoch": epoch, "k": k, "metric": metric, "kind": kind,
              "temperature": temperature, "train_tokens": int(train["next_token"].numel()),
              "validation_tokens": int(len(targets)), "model_loss": model_loss, "layers": []}
    labels = {"next_token": train["next_token"].numpy(), "seed": train["seed"].numpy()}
    for layer, (keys, queries) in enumerate(tqdm(list(zip(train["layers"], val["layers"])),
                                               desc="kNN per layer", disable=not progress)):
        index = build_index(keys, labels, metric=metric, kind=kind, info={"layer": layer, "epoch": epoch})
        save_index(index, os.path.join(out_dir, f"layer{layer}"))
        scores, ids = search(index, queries, min(k, index.ntotal))
        probs = knn_distribution(index, ids, neighbour_weights(index, scores, temperature), "next_token", vocab)
        report["layers"].append({
            "layer": layer,
            "knn_accuracy": float((probs.argmax(1) == targets).mean()),
            "seed_purity": neighbour_purity(index, ids, "seed", val["seed"].numpy()),
            "next_token_purity": neighbour_purity(index, ids, "next_token", targets),
            "knn_lm_loss": {str(lam): v for lam, v in knn_lm_losses(val["lm_logprobs"], probs, targets, lambdas).items()},
        })
    report["model_accuracy"] = float((val["lm_logprobs"].argmax(1).numpy() == targets).mean())
    with open(os.path.join(out_dir, "knn.json"), "w") as f:
        json.dump(report, f, indent=1)
    _plot(report, os.path.join(out_dir, "knn.png"))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [
        f"# kNN over the training history — {report['run']} (epoch {report['epoch']})",
        "",
        f"{report['train_tokens']:,} training tokens indexed per layer ({report['kind']}, {report['metric']}), "
        f"{report['validation_tokens']:,} validation tokens as queries, k = {report['k']}, temperature "
        f"{report['temperature']}. Model: next-token accuracy {report['model_accuracy']:.3f}, loss "
        f"{report['model_loss']:.4f} nats.",
        "",
        *table(["layer", "kNN next-token acc", "seed purity", "next-token purity",
                *(f"kNN-LM loss λ={lam}" for lam in report["layers"][0]["knn_lm_loss"])],
               [[r["layer"], f"{r['knn_accuracy']:.3f}", f"{r['seed_purity']:.3f}", f"{r['next_token_purity']:.3f}",
                 *(f"{v:.4f}" for v in r["knn_lm_loss"].values())] for r in report["layers"]]),
        "",
        "Layer 0 is the embedding output; the last layer is the final-LayerNorm output the LM head "
        "reads. λ = 0 is the model's own loss; λ = 1 is the kNN distribution alone.",
    ]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: str) -> None:
    import matplotlib  # when plotting: pyplot would add half a second to every `metaclm` start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in report["layers"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(layers, [r["knn_accuracy"] for r in report["layers"]], "o-", label="kNN next-token accuracy")
    a.plot(layers, [r["seed_purity"] for r in report["layers"]], "s--", label="seed purity of neighbours")
    a.axhline(report["model_accuracy"], color="gray", ls=":", label="model accuracy")
    a.set_xlabel("layer")
    a.set_ylim(0, 1.02)
    a.legend(fontsize=8)
    a.set_title("kNN over training-token representations", fontsize=9)
    for r in report["layers"]:
        lam = [float(x) for x in r["knn_lm_loss"]]
        b.plot(lam, list(r["knn_lm_loss"].values()), "o-", label=f"layer {r['layer']}")
    b.set_xlabel("λ (weight of the kNN distribution)")
    b.set_ylabel("validation loss (nats)")
    b.set_title("kNN-LM interpolation", fontsize=9)
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
