"""Appendix B: the linearised Transformer layer and Proposition 1's eigenvalue condition.

Dropping softmax, layer norms, biases and the FFN activation, layer l maps the current token z_n to
W_linear z_n with W_linear = (I + W_FFN)(I + W_MHSA), where (eq. 16-18, per-head matrices as in Section 4.1)
  W_MHSA = sum_h W_O^h W_V^h (sum_{i<=n} z_i z_i^T) (W_K^h)^T W_Q^h,   W_FFN = W_2 W_1.
Only GPT-2-design layers (plain two-matrix FFN) have this form; gated FFNs (LLaMA, Gemma) do not, so the
paper, and we, skip them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import VOCAB
from .models import wrap


@dataclass
class LayerWeights:
    """Per-head projections in the paper's convention (act on column vectors), float64."""
    q: torch.Tensor   # [H, dh, d]
    k: torch.Tensor   # [H, dh, d]
    v: torch.Tensor   # [H, dh, d]
    o: torch.Tensor   # [H, d, dh]
    w1: torch.Tensor  # [ff, d]
    w2: torch.Tensor  # [d, ff]


def is_gpt2_design(model) -> bool:
    return getattr(model.config, "model_type", None) == "gpt2"


def gpt2_weights(block, n_head: int) -> LayerWeights:
    """GPT-2's Conv1D layers compute x @ W, so the paper's matrices are the transposed column blocks."""
    c_attn = block.attn.c_attn.weight.detach().double()     # [d, 3d]
    d = c_attn.shape[0]
    if d % n_head:
        raise ValueError(f"hidden size {d} is not divisible by {n_head} heads")
    dh = d // n_head

    def heads(w):  # [d, d] (x @ w) -> [H, dh, d]
        return w.T.reshape(n_head, dh, d)

    q, k, v = (heads(c_attn[:, i * d : (i + 1) * d]) for i in range(3))
    o = block.attn.c_proj.weight.detach().double().reshape(n_head, dh, d).transpose(1, 2)  # [H, d, dh]
    w1 = block.mlp.c_fc.weight.detach().double().T
    w2 = block.mlp.c_proj.weight.detach().double().T
    return LayerWeights(q, k, v, o, w1, w2)


def linearized_layer(w: LayerWeights, z: torch.Tensor) -> torch.Tensor:
    """W_linear [d, d] for a current token whose context (itself last) is z [n, d] at the layer's input."""
    z = z.double()
    gram = z.T @ z                                                   # sum_i z_i z_i^T
    inner = w.v @ gram @ w.k.transpose(1, 2)                         # [H, dh, dh]: W_V C W_K^T
    h, d, dh = w.o.shape
    mhsa = (w.o @ inner).transpose(0, 1).reshape(d, h * dh) @ w.q.reshape(h * dh, d)
    eye = torch.eye(d, dtype=torch.float64, device=z.device)
    return (eye + w.w2 @ w.w1) @ (eye + mhsa)


def proposition1(weight: torch.Tensor, x: torch.Tensor) -> dict:
    """Proposition 1's condition sum_i lambda_i a_i b_i >= sum_i a_i b_i, with W^T W = U Lambda U^-1,
    a = U^T x, b = U^-1 x (U orthogonal here, the Gram matrix being symmetric). It implies ||Wx|| >= ||x||."""
    if weight.dim() != 2 or x.dim() != 1 or weight.shape[1] != x.shape[0]:
        raise ValueError(f"weight [d_out, d_in] and x [d_in] do not match: {tuple(weight.shape)}, {tuple(x.shape)}")
    weight, x = weight.double(), x.double()
    lam, u = torch.linalg.eigh(weight.T @ weight)
    a = u.T @ x
    b = torch.linalg.solve(u, x)
    lhs, rhs = float((lam * a * b).sum()), float((a * b).sum())
    # rhs = ||x||^2 >= 0; the 1e-9 relative slack keeps equality (eigenvalues all 1) from failing on rounding.
    return {"lhs": lhs, "rhs": rhs, "satisfied": lhs >= rhs * (1 - 1e-9), "min_eigenvalue": float(lam[0]),
            "max_eigenvalue": float(lam[-1]), "norm_ratio": float((weight @ x).norm() / x.norm())}


def layer_conditions(weights: list[LayerWeights], inputs: torch.Tensor, outputs: torch.Tensor | None = None) -> list[dict]:
    """Proposition 1 at every layer for one sample. inputs [L, n, d]: each layer's input at positions 1..n;
    the current token is position n. outputs [L, d], when given: each real block's raw output for the current
    token, whose norm ratio (``block_norm_ratio``) is reported beside the linearised one."""
    out = []
    for l, w in enumerate(weights):
        w_lin = linearized_layer(w, inputs[l])
        row = {"layer": l + 1, **proposition1(w_lin, inputs[l, -1])}
        if outputs is not None:
            row["block_norm_ratio"] = float(outputs[l].double().norm() / inputs[l, -1].double().norm())
        out.append(row)
    return out


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def quantiles(values: list[float]) -> dict:
    """{"q0": min, "q5": ..., "q50": median, ..., "q100": max} of a non-empty list."""
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"q{round(100 * p)}": float(v) for p, v in zip(QUANTILES, q)}


def summarise(rows: list[dict]) -> dict:
    """Appendix B over [{"layers": layer_conditions(...)}] rows: the share of (sample, layer) pairs meeting
    Proposition 1, overall and per layer, and the distributions of ||W_linear x|| / ||x|| and of the real
    blocks' norm ratios (the quantity Proposition 1 is about: a share alone hides how far from 1 they are)."""
    pairs = [layer for r in rows for layer in r["layers"]]
    if not pairs:
        raise ValueError("Appendix B needs at least one (sample, layer) pair, got none")
    layers = len(rows[0]["layers"])

    def percent(flags) -> float:
        flags = list(flags)
        return 100.0 * sum(flags) / len(flags)

    out = {"samples": len(rows), "pairs": len(pairs),
           "satisfied_percent": percent(p["satisfied"] for p in pairs),
           "per_layer_satisfied_percent": [percent(r["layers"][l]["satisfied"] for r in rows) for l in range(layers)],
           "min_eigenvalue_ge_1_percent": percent(p["min_eigenvalue"] >= 1 for p in pairs),
           "norm_ratio_ge_1_percent": percent(p["norm_ratio"] >= 1 for p in pairs),
           "norm_ratio_quantiles": quantiles([p["norm_ratio"] for p in pairs])}
    if all("block_norm_ratio" in p for p in pairs):
        out["block_norm_ratio_ge_1_percent"] = percent(p["block_norm_ratio"] >= 1 for p in pairs)
        out["block_norm_ratio_quantiles"] = quantiles([p["block_norm_ratio"] for p in pairs])
    return out


def synthetic_run(run_dir, epoch: int | None = None, max_samples: int = 200) -> dict:
    """Appendix B on a `metaclm train` run: Proposition 1 per layer for the last token (``<eos>``) of each of
    the first ``max_samples`` validation sequences (the synthetic model is GPT-2 design, so W_linear exists).

    Returns the summary (see ``summarise``; the model and current token named) with ``per_sample`` rows.
    """
    from ..training import load_checkpoint, load_run, make_batch

    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    run = load_run(run_dir)
    model = load_checkpoint(run_dir, epoch)
    lm = wrap(model, None, "synthetic Table 5 model")
    weights = [gpt2_weights(block, model.config.n_head) for block in lm.layers]
    n_layer = model.config.n_layer
    rows, current = [], set()
    for row in run.data["validation"][:max_samples]:
        b = make_batch([row])
        current.add(VOCAB[int(b.input_ids[0, -1])])
        states = lm.states(b.input_ids, b.attention_mask)[:, 0]          # [L+1, n, d], raw (no ln_f)
        rows.append({"sequence": row["id"], "layers": layer_conditions(weights, states[:n_layer], states[1:, -1])})
    epoch = epoch if epoch is not None else run.epochs[-1]
    return {
        "run": str(run_dir), "epoch": epoch,
        "model": f"synthetic Table 5 model (GPT-2 design, {n_layer} layers; stand-in for GPT-2), epoch {epoch}",
        "current_token": f"the last token of each validation sequence ({', '.join(sorted(current))})",
        **summarise(rows), "per_sample": rows,
    }
