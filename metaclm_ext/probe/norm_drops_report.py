"""Writing a norm-drop analysis (norm_drops_run.py): norm_drops.json, norm_drops.png and norm_drops.md; the
Markdown lines are also REPORT.md's section under Table 1."""
from __future__ import annotations

import json
from pathlib import Path

from ..markdown import table

FIGURE = "norm_drops.png"


def _dims(entries: list[dict], key: str) -> str:
    return ", ".join(f"{e['dim']} ({e[key]:.1f}%)" for e in entries)


def _in_short(result: dict) -> str:
    """The findings in one paragraph, every number read from the result."""
    base, worst = result["removal"][0], result["worst_steps"][0]
    removal = {r["removed"]: r for r in result["removal"]}
    text = (f"**In short.** With every dimension, {base['sequence_percent']:.1f}% of trajectories and "
            f"{base['pair_percent']:.1f}% of steps keep the norm (Table 1). ")
    if worst["cause"] is None:
        return text + "No token's norm drops at any step."
    a = worst["from_state"]
    shares = {r["dim"]: r["share_percent_by_state"][a] for r in result["dominant_dims"]["ranking"]}
    dims = worst["attributed_dims"]
    text += (f"The worst step, {a} -> {a + 1}, keeps {worst['nondecreasing_percent']:.1f}% of tokens; there the "
             f"{'MLP' if worst['cause'] == 'mlp' else 'attention'} sublayer drops the norms (attention keeps "
             f"{worst['attention_nondecreasing_percent']:.1f}%, the MLP {worst['mlp_nondecreasing_percent']:.1f}%). ")
    if all(d in shares for d in dims):
        text += (f"Dimension{'s' if len(dims) > 1 else ''} {', '.join(map(str, dims))} hold "
                 f"{' and '.join(f'{shares[d]:.1f}%' for d in dims)} of the squared norm at state {a}. ")
    if len(dims) in removal:
        r = removal[len(dims)]
        text += f"Without them: {r['sequence_percent']:.1f}% / {r['pair_percent']:.1f}%. "
    tolerated = [t for t in result["tolerance"] if t["tau_percent"]]
    if tolerated:
        text += (f"A tolerance of {tolerated[0]['tau_percent']:g}-{tolerated[-1]['tau_percent']:g}% per step gives "
                 f"{tolerated[0]['sequence_percent']:.1f}-{tolerated[-1]['sequence_percent']:.1f}% of trajectories.")
    return text.rstrip()


def markdown_lines(result: dict, figure: str) -> list[str]:
    """The analysis as Markdown (no title): counts, per-step table, worst steps, dominant dimensions, tolerance
    curve and removal of the top dimensions; ``figure`` is the path the figure is linked by."""
    n, m = result["counts"], result["model"]
    s = result["states"]
    removal = {r["removed"]: r for r in result["removal"]}
    shown = [k for k in sorted(removal) if k]
    lines = [f"{m['description']} on {result['corpus']['description']}: {n['studied_tokens_kept']:,} studied tokens of "
             f"{n['kept_after_loss_filter']:,} kept samples ({n['sampled']:,} sampled, max "
             f"{result['config']['max_tokens']} tokens), states 0 .. {s - 1} as in Table 1 (last layer excluded). A "
             "step keeps a token's norm when the norm does not decrease.", "", _in_short(result), "",
             "**Where the norms drop.** % of tokens whose norm does not decrease at each step, with the norm taken "
             "over all dimensions and without the top dominant ones:", ""]
    header = ["step", "all dims %", *(f"without top {k} %" for k in shown)]
    rows = [[f"{i} -> {i + 1}", f"{result['pair_percent_by_step'][i]:.1f}",
             *(f"{removal[k]['pair_percent_by_step'][i]:.1f}" for k in shown)] for i in range(s - 1)]
    lines += table(header, rows) + ["", "**Which sublayer.** The worst steps split into the block's attention and "
                                    "MLP sublayers (norm before the block, after attention, after the MLP); mean "
                                    "changes are over the tokens whose norm drops across the block, in % of the norm "
                                    "before it:", ""]
    rows = [[f"{w['from_state']} -> {w['to_state']} (block {w['to_state']})", f"{w['nondecreasing_percent']:.1f}",
             f"{w['attention_nondecreasing_percent']:.1f}", f"{w['mlp_nondecreasing_percent']:.1f}",
             "—" if w["cause"] is None else f"{w['mean_attention_change_percent']:+.1f} / {w['mean_mlp_change_percent']:+.1f}",
             "—" if w["cause"] is None else f"**{w['cause']}**",
             "—" if w["drop_share_in_attributed_dims_percent"] is None
             else f"{w['drop_share_in_attributed_dims_percent']:.0f}% ({', '.join(map(str, w['attributed_dims']))})"]
            for w in result["worst_steps"]]
    lines += table(["step", "block keeps %", "attention keeps %", "MLP keeps %", "mean change attention / MLP %",
                    "cause", "squared-norm loss in top dims"], rows)
    dims = result["dominant_dims"]
    per_state = dims["per_state"]
    lines += ["", f"**Dominant dimensions.** Share of the squared norm (mean over tokens of x_j^2 / |x|^2). Ranked by "
              f"the mean share over the {s} states: {_dims(dims['ranking'], 'mean_share_percent')}. Per state, the "
              "top dimensions:", ""]
    lines += table(["state", "top dimensions (share %)"],
                   [[i, _dims(row, "share_percent")] for i, row in enumerate(per_state)])
    lines += ["", "**Tolerance.** A step counts as kept when the norm falls by at most tau % of the norm before it:", ""]
    lines += table(["tau %", "sequence %", "pair %"],
                   [[f"{t['tau_percent']:g}", f"{t['sequence_percent']:.1f}", f"{t['pair_percent']:.1f}"]
                    for t in result["tolerance"]])
    lines += ["", "**Removing the top dimensions** (ranked as above) from every state before taking norms:", ""]
    lines += table(["removed", "dimensions", "sequence %", "pair %"],
                   [[r["removed"], ", ".join(map(str, r["dims"])) or "none (Table 1)", f"{r['sequence_percent']:.1f}",
                     f"{r['pair_percent']:.1f}"] for r in result["removal"]])
    return lines + ["", f"![norm drops: per step, tolerance, dominant dimensions]({figure})"]


def plot(result: dict, path: Path) -> None:
    """Three panels: per-step non-decreasing % with and without the top dimensions, the tolerance curve, and the
    share of the squared norm in the top-ranked dimensions per state."""
    import matplotlib  # when plotting: pyplot would add half a second to every `metaclm` start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (steps, tol, share) = plt.subplots(1, 3, figsize=(14, 4.2))
    for r in result["removal"]:
        label = "all dimensions" if not r["removed"] else f"without {', '.join(map(str, r['dims']))}"
        steps.plot(range(len(r["pair_percent_by_step"])), r["pair_percent_by_step"], "o-", ms=3, label=label)
    steps.set_xlabel("step (state i -> i+1)")
    steps.set_ylabel("tokens whose norm does not decrease (%)")
    steps.set_ylim(0, 102)
    steps.legend(fontsize=7)
    taus = [t["tau_percent"] for t in result["tolerance"]]
    for key in ("sequence_percent", "pair_percent"):
        tol.plot(taus, [t[key] for t in result["tolerance"]], "o-", label=key.split("_")[0])
    tol.set_xlabel("tolerance tau (% of the norm before a step)")
    tol.set_ylabel("non-decreasing (%)")
    tol.set_ylim(0, 102)
    tol.legend(fontsize=7)
    for rank in result["dominant_dims"]["ranking"]:
        shares = rank["share_percent_by_state"]
        share.plot(range(len(shares)), shares, "o-", ms=3, label=f"dim {rank['dim']}")
    share.set_xlabel("state (0 = embeddings)")
    share.set_ylabel("share of the squared norm (%)")
    share.legend(fontsize=7)
    fig.suptitle(f"Where current-token norms drop: {result['model']['description']}\n"
                 f"{result['corpus']['description']}, {result['counts']['studied_tokens_kept']:,} tokens", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir) -> dict:
    """norm_drops.json, norm_drops.png and norm_drops.md in out_dir; returns {"json", "figure", "summary"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / FIGURE)
    (out / "norm_drops.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "norm_drops.md").write_text("\n".join([f"# Why current-token norms drop: {result['model']['description']}",
                                                  "", *markdown_lines(result, FIGURE)]) + "\n")
    return {"json": "norm_drops.json", "figure": FIGURE, "summary": "norm_drops.md"}
