"""The probe pipeline: corpus -> model -> per-layer states -> inner loss, norms, PCA, Appendix B."""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from . import linear, norms, pca
from .corpora import load_corpus
from .lens import layer_trend, make_batch, token_stats
from .models import load_model

LOSS_FILTER = 10.0   # the paper drops samples whose final-layer loss is above 10
LENS_LABEL = "logit lens: the model's final norm, then the LM head"
HEAD_ONLY_LABEL = "Eq. 9 as written: the LM head applied to z directly (no final norm)"
# Table 1 and the PCA figures, one trajectory per sample: "for the majority of samples" (Section 8.1) and one
# coloured path per sample (Figures 5/8). The last studied token is the one that sees the most context.
PER_SAMPLE_UNIT = "one trajectory per kept sample: its last studied token"


@dataclass
class ProbeConfig:
    model: str
    corpus: str
    max_samples: int | None = None
    batch_size: int = 8
    max_tokens: int = 128
    pca_samples: int = 50
    linear_samples: int = 50
    seed: int = 0
    device: str | None = None

    def check(self) -> None:
        for name in ("batch_size", "pca_samples", "linear_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 8:
            raise ValueError(f"--max-tokens must be >= 8 (positions from the 5th on need context), got {self.max_tokens}")


def length_sorted_batches(samples: list[str], batch_size: int) -> list[list[int]]:
    """Indices of ``samples`` in batches of at most batch_size, shortest texts first: less padding per batch."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    return [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]


def kept_by_loss(last_layer_loss: float) -> bool:
    """The paper's filter: a sample is kept when its mean last-layer loss is at most LOSS_FILTER."""
    return bool(last_layer_loss <= LOSS_FILTER)


def open_probe(cfg: ProbeConfig):
    """What every pass over the probe's samples starts from, once cfg is checked: (device, corpus sample, model
    on that device)."""
    cfg.check()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, load_corpus(cfg.corpus, cfg.max_samples, cfg.seed), load_model(cfg.model, device)


def nothing_kept(cfg: ProbeConfig) -> ValueError:
    """The error of a pass in which no sample passed the filters."""
    return ValueError(f"no sample of --corpus {cfg.corpus} passed the filters (>= 1 studied position, "
                      f"final loss <= {LOSS_FILTER})")


def run_probe(cfg: ProbeConfig, progress: bool = True) -> dict:
    """Everything the report needs, as plain numbers (plus the PCA points); see report.write_outputs."""
    started = time.perf_counter()
    device, corpus, lm = open_probe(cfg)
    n_layers = len(lm.layers)
    gpt2 = linear.is_gpt2_design(lm.model)
    weights = [linear.gpt2_weights(b, lm.model.config.n_head) for b in lm.layers] if gpt2 else None

    records: dict[int, dict] = {}
    token_norms, last_states, linear_rows = {}, {}, []
    for idx in tqdm(length_sorted_batches(corpus.samples, cfg.batch_size), desc=f"probe {cfg.model}",
                    disable=not progress):
        batch = make_batch(lm.tokenizer, [corpus.samples[i] for i in idx], cfg.max_tokens, device)
        states = lm.states(batch.input_ids, batch.attention_mask)
        losses, tok_norms, which = token_stats(lm, states, batch)
        head_losses, _, _ = token_stats(lm, states, batch, final_norm=False)
        for b, i in enumerate(idx):
            sel = which == b
            rec = {"index": i, "text": corpus.samples[i], "tokens": int(batch.lengths[b]), "positions": int(sel.sum())}
            records[i] = rec
            if not rec["positions"]:
                rec["kept"] = False
                continue
            rec["layer_loss"] = losses[:, sel].mean(1).tolist()
            rec["layer_loss_head_only"] = head_losses[:, sel].mean(1).tolist()
            rec["last_layer_loss"] = _filter_variants(losses[-1, sel], head_losses[-1, sel])
            rec["kept"] = kept_by_loss(rec["last_layer_loss"]["logit_lens"]["mean"])
            if rec["kept"]:
                token_norms[i] = tok_norms[:, sel].T.cpu()                 # [positions, L+1]
                current = int(batch.last_studied()[b])
                last_states[i] = states[:, b, current].cpu()               # [L+1, d]
                if gpt2 and len(linear_rows) < cfg.linear_samples:
                    rows = linear.layer_conditions(weights, states[:n_layers, b, : current + 1],
                                                   states[1:, b, current])
                    linear_rows.append({"index": i, "layers": rows})
    samples = [records[i] for i in range(len(corpus.samples))]
    kept = [r for r in samples if r["kept"]]
    if not kept:
        raise nothing_kept(cfg)

    for r in kept:
        r["norms"] = token_norms[r["index"]].tolist()
    all_norms = torch.cat([token_norms[r["index"]] for r in kept])        # [tokens, L+1]
    last_norms = torch.stack([token_norms[r["index"]][-1] for r in kept])  # [kept, L+1]
    rng = random.Random(cfg.seed)
    shown = sorted(rng.sample([r["index"] for r in kept], min(cfg.pca_samples, len(kept))))
    # Conjecture 8.1 and the paper's figures leave the last layer out: states 0 (embeddings) .. L-1.
    points, explained = pca.project(torch.stack([last_states[i][:n_layers] for i in shown]))

    result = {
        "model": {"spec": cfg.model, "description": lm.description, "family": lm.family, "layers": n_layers,
                  "hidden_size": int(last_states[shown[0]].shape[-1])},
        "corpus": {"spec": cfg.corpus, "description": corpus.description, "source": corpus.source,
                   "paper_key": corpus.paper_key},
        "config": {**asdict(cfg), "device": device, "loss_filter": LOSS_FILTER},
        "counts": {"available_ge_10_words": corpus.available, "sampled": len(samples),
                   "scored": sum(1 for r in samples if r["positions"]), "kept_after_loss_filter": len(kept),
                   "studied_tokens_kept": int(all_norms.shape[0])},
        "inner_loss": {"label": LENS_LABEL, **_loss_curve([r["layer_loss"] for r in kept])},
        "inner_loss_head_only": {"label": HEAD_ONLY_LABEL, **_loss_curve([r["layer_loss_head_only"] for r in kept])},
        "table3_variants": _table3_variants([r for r in samples if r["positions"]]),
        "norms": {"mean": all_norms.mean(0).tolist(),
                  "table1": norms.nondecreasing(all_norms[:, :n_layers]),
                  "with_last_layer": norms.nondecreasing(all_norms),
                  "per_sample": {"unit": PER_SAMPLE_UNIT,
                                 "table1": norms.nondecreasing(last_norms[:, :n_layers]),
                                 "with_last_layer": norms.nondecreasing(last_norms)}},
        "pca": {"unit": PER_SAMPLE_UNIT, "samples": shown, "explained_variance_ratio": explained,
                "points": points.tolist()},
        "linear": _linear_summary(gpt2, linear_rows),
        "samples": samples,
        "seconds": time.perf_counter() - started,
    }
    return result


def _filter_variants(lens_last: torch.Tensor, head_last: torch.Tensor) -> dict:
    """A sample's last-layer loss three ways (mean, last studied token, sum over its studied tokens), through
    the logit lens and the LM head alone: the candidates for the paper's "final value" of Table 3's filter."""
    return {curve: {"mean": float(v.mean()), "last_token": float(v[-1]), "sum": float(v.sum())}
            for curve, v in (("logit_lens", lens_last), ("head_only", head_last))}


def _table3_variants(scored: list[dict]) -> dict:
    """How many scored samples each candidate filter (final value <= LOSS_FILTER) keeps."""
    return {"scored": len(scored), "threshold": LOSS_FILTER, "kept": {
        curve: {way: sum(kept_by_loss(r["last_layer_loss"][curve][way]) for r in scored)
                for way in ("mean", "last_token", "sum")} for curve in ("logit_lens", "head_only")}}


def _loss_curve(per_sample: list[list[float]]) -> dict:
    """Mean (over samples) inner loss per state, its spread, end points and the trend over layers 1..L."""
    loss = torch.tensor(per_sample)                                        # [kept, L+1]
    mean = loss.mean(0).tolist()
    return {"states": list(range(loss.shape[1])), "mean": mean,
            "std": loss.std(0).tolist() if len(loss) > 1 else [0.0] * loss.shape[1],
            "first": mean[0], "layer1": mean[1], "last": mean[-1], "min_state": int(loss.mean(0).argmin()),
            "trend_rho": layer_trend(mean)}


def _linear_summary(gpt2: bool, rows: list[dict]) -> dict:
    if not gpt2:
        return {"applicable": False, "reason": "not a GPT-2-design model: its FFN is gated (LLaMA/Gemma), so "
                "W_FFN = W_2 W_1 does not exist; the paper also ran Appendix B on GPT-2 only"}
    return {"applicable": True, "current_token": "the last studied token of each kept sample",
            **linear.summarise(rows), "per_sample": rows}
