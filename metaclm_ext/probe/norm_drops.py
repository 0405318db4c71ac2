"""Why Table 1's sequence level can be low while its pair level is high: where current-token norms drop, which
sublayer of the block drops them, and how much of it a few dominant ("massive") residual dimensions carry.

Input: the states of N studied tokens over S consecutive states (Table 1's states 0 .. L-1), [N, S, d], and the
norm of the residual stream after the attention sublayer of each block between them, [N, S-1] (the block from
state s to s+1: state s -> + attention -> + MLP -> state s+1). A step "keeps" a token's norm when it does not
decrease (equal counts, as in Table 1).

- per step: the % of tokens whose norm does not decrease; for the worst steps, the same for the attention and the
  MLP sublayer alone, their mean norm change over the tokens that drop, and the share of the squared-norm loss that
  lies in the top dominant dimensions;
- dominant dimensions: per state, each dimension's share of the squared norm (mean over tokens of x_j^2 / |x|^2);
  dimensions are ranked by that share averaged over the states (each state weighs the same, so the large norms of
  late layers do not decide the ranking alone);
- tolerance: sequence and pair level when a step may fall by up to tau % of the norm before it;
- removal: sequence and pair level of the norms taken without the top m ranked dimensions.
"""
from __future__ import annotations

import torch

from .norms import nondecreasing

TAUS = (0.0, 0.5, 1.0, 2.0, 5.0)     # tolerance per step, % of the norm before the step
REMOVED = (0, 1, 2, 4)               # how many top dimensions are removed before taking norms
TOP_DIMS = 4                         # dimensions named per state
WORST_STEPS = 2                      # steps split into attention and MLP
ATTRIBUTED_DIMS = 2                  # top dimensions whose share of a worst step's squared-norm loss is reported
_CHUNK = 4096                        # tokens per slice of the per-dimension passes: bounds their extra memory


def _check_states(states) -> None:
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or not states.is_floating_point():
        raise ValueError(f"states must be a 3-D float tensor [tokens, states, hidden], got "
                         f"{getattr(states, 'shape', type(states).__name__)}")
    n, s, d = states.shape
    if n == 0 or s < 2 or d == 0:
        raise ValueError(f"states needs at least one token, two states and one dimension, got shape {tuple(states.shape)}")
    if not bool(torch.isfinite(states).all()):
        raise ValueError("states holds non-finite values")
    if bool((states.norm(dim=-1) == 0).any()):
        raise ValueError("states holds an all-zero state vector: its dimensions have no share of its norm")


def _check_count(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def dim_shares(states: torch.Tensor) -> torch.Tensor:
    """[S, d] float64: at each state, each dimension's share of the squared norm, averaged over the tokens."""
    _check_states(states)
    total = torch.zeros(states.shape[1:], dtype=torch.float64)
    for chunk in states.split(_CHUNK):  # float64 squares of every token at once would be 2x the states' memory
        sq = chunk.double().pow(2)
        total += (sq / sq.sum(-1, keepdim=True)).sum(0)
    return total / states.shape[0]


def dominant_dims(states: torch.Tensor, top: int = TOP_DIMS) -> dict:
    """The top dimensions overall (ranked by their mean share over the states, with their share at every state)
    and the top dimensions of each state, shares in %."""
    shares = dim_shares(states)
    _check_count("top", top, 1, shares.shape[1])
    mean = shares.mean(0)
    ranked = torch.argsort(mean, descending=True, stable=True)[:top]
    per_state = torch.topk(shares, top, dim=1)
    return {
        "ranking": [{"dim": int(j), "mean_share_percent": 100.0 * float(mean[j]),
                     "share_percent_by_state": (100.0 * shares[:, j]).tolist()} for j in ranked],
        "per_state": [[{"dim": int(j), "share_percent": 100.0 * float(v)} for j, v in zip(idx, val)]
                      for idx, val in zip(per_state.indices, per_state.values)],
    }


def norms_without(states: torch.Tensor, dims) -> torch.Tensor:
    """[N, S] norms of every state with the dimensions ``dims`` left out (none left out: the plain norms)."""
    _check_states(states)
    dims = [int(j) for j in dims]
    if any(not 0 <= j < states.shape[2] for j in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"dims must be distinct indices in [0, {states.shape[2]}), got {dims}")
    kept = torch.ones(states.shape[2], dtype=torch.bool)
    kept[dims] = False
    if not bool(kept.any()):
        raise ValueError("dims leaves no dimension to take a norm over")
    if not dims:
        return states.norm(dim=-1)
    return torch.cat([chunk[..., kept].norm(dim=-1) for chunk in states.split(_CHUNK)])


def tolerance_curve(norms: torch.Tensor, taus=TAUS) -> list[dict]:
    """Sequence and pair % when a step counts as kept if the norm falls by at most tau % of the norm before it."""
    nondecreasing(norms)  # Table 1's checks of the norms; with tau = 0 the rows below are exactly its numbers
    taus = [float(t) for t in taus]
    if not taus or any(not t >= 0 or t >= 100 for t in taus):
        raise ValueError(f"taus must be a non-empty list of percentages in [0, 100), got {taus}")
    rows = []
    for tau in taus:
        kept = norms[:, 1:] >= (1.0 - tau / 100.0) * norms[:, :-1]
        rows.append({"tau_percent": tau, "sequence_percent": 100.0 * float(kept.all(1).double().mean()),
                     "pair_percent": 100.0 * float(kept.double().mean())})
    return rows


def sublayer_split(before: torch.Tensor, after_attention: torch.Tensor, after: torch.Tensor) -> dict:
    """One block's step over N tokens (norms [N] before, after its attention sublayer, after its MLP): how often
    each sublayer keeps the norm, and the mean change each makes (in % of the norm before) over the tokens whose
    norm drops over the whole block. ``cause`` names the sublayer with the larger mean drop there."""
    for name, t in (("before", before), ("after_attention", after_attention), ("after", after)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape != before.shape or not len(t):
            raise ValueError(f"{name} must be a non-empty 1-D tensor of norms shaped like before, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must hold finite non-negative norms")
    if bool((before == 0).any()):
        raise ValueError("before holds a zero norm: changes relative to it are undefined")
    drop = after < before
    attention = 100.0 * (after_attention - before).double() / before
    mlp = 100.0 * (after - after_attention).double() / before
    split = {"nondecreasing_percent": 100.0 * float((~drop).double().mean()),
             "attention_nondecreasing_percent": 100.0 * float((after_attention >= before).double().mean()),
             "mlp_nondecreasing_percent": 100.0 * float((after >= after_attention).double().mean()),
             "dropping_tokens": int(drop.sum()), "mean_attention_change_percent": None,
             "mean_mlp_change_percent": None, "cause": None}
    if drop.any():
        a, m = float(attention[drop].mean()), float(mlp[drop].mean())
        split.update(mean_attention_change_percent=a, mean_mlp_change_percent=m, cause="mlp" if m < a else "attention")
    return split


def drop_share_in_dims(before: torch.Tensor, after: torch.Tensor, dims) -> float | None:
    """Over the tokens whose norm drops from ``before`` [N, d] to ``after`` [N, d]: the % of their summed
    squared-norm loss that the dimensions ``dims`` carry (over 100 when the other dimensions grow); None if no
    token drops."""
    if before.shape != after.shape or before.dim() != 2:
        raise ValueError(f"before and after must both be [tokens, hidden], got {tuple(before.shape)} and "
                         f"{tuple(after.shape)}")
    change = after.double().pow(2) - before.double().pow(2)          # [N, d]
    drop = after.norm(dim=-1) < before.norm(dim=-1)
    if not drop.any():
        return None
    return 100.0 * float(change[drop][:, list(dims)].sum() / change[drop].sum())


def explain(states: torch.Tensor, after_attention: torch.Tensor, taus=TAUS, removed=REMOVED, top: int = TOP_DIMS,
            worst: int = WORST_STEPS, attributed: int = ATTRIBUTED_DIMS) -> dict:
    """The whole analysis of states [N, S, d] with after-attention norms [N, S-1] (see the module docstring)."""
    _check_states(states)
    n, s, d = states.shape
    if (not isinstance(after_attention, torch.Tensor) or tuple(after_attention.shape) != (n, s - 1)):
        raise ValueError(f"after_attention must be a tensor [tokens, states - 1] = {[n, s - 1]}, got "
                         f"{getattr(after_attention, 'shape', type(after_attention).__name__)}")
    removed = [int(m) for m in removed]
    if not removed or any(not 0 <= m < d for m in removed):
        raise ValueError(f"removed must be a non-empty list of counts in [0, {d}), got {removed}")
    _check_count("top", top, 1, d)
    _check_count("worst", worst, 1, s - 1)
    _check_count("attributed", attributed, 1, d)
    dims = dominant_dims(states, max(top, max(removed), attributed))
    ranked = [r["dim"] for r in dims["ranking"]]
    dims = {"ranking": dims["ranking"][:top], "per_state": [row[:top] for row in dims["per_state"]]}
    norms = states.norm(dim=-1)
    by_step = nondecreasing(norms)["pair_percent_by_step"]
    removal = []
    for m in removed:
        table = nondecreasing(norms_without(states, ranked[:m]))
        removal.append({"removed": m, "dims": ranked[:m], **{k: table[k] for k in (
            "sequence_percent", "pair_percent", "pair_percent_by_step")}})
    worst_steps = []
    for step in sorted(range(s - 1), key=lambda i: (by_step[i], i))[:worst]:
        split = sublayer_split(norms[:, step], after_attention[:, step], norms[:, step + 1])
        worst_steps.append({"from_state": step, "to_state": step + 1, **split, "attributed_dims": ranked[:attributed],
                            "drop_share_in_attributed_dims_percent": drop_share_in_dims(
                                states[:, step], states[:, step + 1], ranked[:attributed])})
    return {"tokens": n, "states": s, "hidden_size": d, "pair_percent_by_step": by_step, "worst_steps": worst_steps,
            "dominant_dims": dims, "tolerance": tolerance_curve(norms, taus), "removal": removal}
