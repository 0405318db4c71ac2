"""Writing a probe result: results.json (every number), PNG figures and summary.md, in one folder."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from . import pca
from .corpora import PAPER_CORPUS_NAMES
from ..markdown import table
from ..paper import paper_numbers, paper_numbers_path


def _figures(result: dict, out: Path) -> dict:
    import matplotlib  # when plotting: pyplot would add half a second to every `metaclm` start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Figure titles are ~90 characters wide at this size: a long model description wraps instead of being cut.
    model, corpus = textwrap.fill(result["model"]["description"], 90), result["corpus"]["description"]
    states = result["inner_loss"]["states"]
    kept = [r for r in result["samples"] if r["kept"]]
    files = {}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, curve, color in (("layer_loss_head_only", "inner_loss_head_only", "tab:red"),
                              ("layer_loss", "inner_loss", "tab:blue")):
        for r in kept:
            ax.plot(states, r[key], color=color, alpha=min(0.3, 8 / len(kept)), lw=0.5)
        ax.plot(states, result[curve]["mean"], "o-", color=color, ms=4,
                label=f"{result[curve]['label']}: mean over {len(kept)} samples")
    ax.set_yscale("log")  # the embeddings' loss can be ~100 nats, the last layer's ~3
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("inner loss (nats, log scale)")
    ax.set_title(f"Inner loss across layers (cf. paper Fig. 4/7)\n{model}\n{corpus}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "inner_loss.png", dpi=120)
    plt.close(fig)
    files["inner_loss"] = "inner_loss.png"

    fig, ax = plt.subplots(figsize=(7, 4.2))
    norms = np.array([row for r in kept for row in r["norms"]])
    ax.plot(states, np.median(norms, 0), "o-", color="black", label="median")
    ax.fill_between(states, np.percentile(norms, 10, 0), np.percentile(norms, 90, 0), alpha=0.3, label="10-90%")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("current-token norm (raw, before final norm)")
    t1, one = result["norms"]["table1"], result["norms"]["per_sample"]["table1"]
    ax.set_title(f"Norms across layers (every studied token); non-decreasing, last layer excluded:\none per sample "
                 f"{one['sequence_percent']:.1f}% sequences / {one['pair_percent']:.1f}% pairs, every studied token "
                 f"{t1['sequence_percent']:.1f}% / {t1['pair_percent']:.1f}%\n{model}\n{corpus}", fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "norms.png", dpi=120)
    plt.close(fig)
    files["norms"] = "norms.png"

    pca.plot(np.array(result["pca"]["points"]),
             f"Current-token trajectories, layers 0..{result['model']['layers'] - 1}, PCA 3-D "
             f"(cf. paper Fig. 5/8), {len(result['pca']['samples'])} samples, {result['pca']['unit']}\n{model}\n{corpus}",
             out / "pca_trajectories.png")
    files["pca"] = "pca_trajectories.png"
    return files


def _table1(result: dict, paper: dict) -> list[str]:
    nm = result["norms"]
    key = result["corpus"]["paper_key"]
    rows = [[f"{result['model']['description']} (this run, {unit})", result["corpus"]["description"],
             f"{t1['sequence_percent']:.1f}", f"{t1['pair_percent']:.1f}"]
            for unit, t1 in (("one per sample", nm["per_sample"]["table1"]), ("every studied token", nm["table1"]))]
    keys = [key] if key else list(PAPER_CORPUS_NAMES)
    for name, cols in paper["table1_nondecreasing_norm_percent"].items():
        if name == "note":
            continue
        rows += [[f"{name} (paper)", PAPER_CORPUS_NAMES[k], cols[k]["sequence"], cols[k]["pair"]] for k in keys]
    return table(["Model", "Corpus", "Sequence (%)", "Pair (%)"], rows)


def _table3(result: dict) -> list[str]:
    v = result["table3_variants"]
    names = {"mean": "mean over its studied tokens", "last_token": "its last studied token",
             "sum": "sum over its studied tokens"}
    rows = [[f"{result[curve]['label']}", names[way], f"{kept[way]} of {v['scored']}"]
            for curve, kept in (("inner_loss", v["kept"]["logit_lens"]), ("inner_loss_head_only", v["kept"]["head_only"]))
            for way in names]
    return table(["last-layer loss through", f"a sample's final value (<= {v['threshold']:g} kept)", "kept"], rows)


def _loss_line(curve: dict) -> str:
    return (f"- {curve['label']}: embeddings (state 0) {curve['first']:.3f} nats, layer 1 {curve['layer1']:.3f}, "
            f"last layer {curve['last']:.3f}; lowest at state {curve['min_state']}; Spearman rho over layers 1..L "
            f"{curve['trend_rho']:.2f}.")


def _linear_lines(lin: dict) -> list[str]:
    if not lin["applicable"]:
        return [f"Not run: {lin['reason']}."]
    return [f"W_linear = (I + W_FFN)(I + W_MHSA) for {lin['current_token']}, {lin['samples']} samples at every "
            f"layer ({lin['pairs']} pairs): Proposition 1's condition holds for **{lin['satisfied_percent']:.1f}%**; "
            f"the smallest Gram eigenvalue is >= 1 for {lin['min_eigenvalue_ge_1_percent']:.1f}%.", "", *ratio_table(lin)]


def ratio_table(summary: dict) -> list[str]:
    """Appendix B's norm ratios per (sample, layer) pair, linearised and real, as quantiles (q0 = min)."""
    rows = [[what, f"{summary[f'{key}_ge_1_percent']:.1f}", *(f"{q:.3g}" for q in summary[f"{key}_quantiles"].values())]
            for what, key in (("‖W_linear x‖ / ‖x‖", "norm_ratio"),
                              ("real block: ‖z_out‖ / ‖z_in‖", "block_norm_ratio"))]
    return table(["norm ratio", ">= 1 (%)", *summary["norm_ratio_quantiles"]], rows)


def markdown(result: dict, files: dict, paper: dict) -> str:
    m, c, n = result["model"], result["corpus"], result["counts"]
    il, t1, one = result["inner_loss"], result["norms"]["table1"], result["norms"]["per_sample"]["table1"]
    lines = [
        f"# metaclm probe: {m['description']}",
        "",
        f"- Model: {m['description']} (`--model {m['spec']}`, {m['family']}, {m['layers']} layers, d={m['hidden_size']})",
        f"- Corpus: {c['description']} (`--corpus {c['spec']}`, {c['source']})",
        f"- Device {result['config']['device']}, batch {result['config']['batch_size']}, max {result['config']['max_tokens']} "
        f"tokens per sample, seed {result['config']['seed']}; {result['seconds']:.1f} s",
        "- Protocol: samples of >= 10 words; current tokens from the 5th text token on; inner loss = cross-entropy of "
        "each decoder layer's raw output through the model's final norm and LM head (logit lens) and through the LM "
        "head alone (Eq. 9 as written); per-sample loss = mean over its tokens; samples whose mean last-layer "
        f"logit-lens loss > {result['config']['loss_filter']} dropped.",
        "",
        "## Counts (cf. paper Table 3; not comparable)",
        "",
        f"{n['available_ge_10_words']} samples of >= 10 words available, {n['sampled']} sampled, {n['scored']} with a "
        f"studied token, **{n['kept_after_loss_filter']} kept** after the loss filter ({n['studied_tokens_kept']} tokens). "
        "The paper keeps 17-77% of its samples; its filter's \"final value\" is not defined in its text, so the "
        "candidates are listed:",
        "",
        *_table3(result),
        "",
        "## Inner loss across layers (cf. paper Figures 4 and 7)",
        "",
        _loss_line(result["inner_loss_head_only"]),
        _loss_line(il),
        "",
        *table(["state", *il["states"]],
               [["mean loss, head only", *(f"{v:.2f}" for v in result["inner_loss_head_only"]["mean"])],
                ["mean loss, logit lens", *(f"{v:.2f}" for v in il["mean"])],
                ["mean norm", *(f"{v:.1f}" for v in result["norms"]["mean"])]]),
        "",
        f"![inner loss]({files['inner_loss']})",
        "",
        "## Non-decreasing norms (cf. paper Table 1)",
        "",
        f"States 0 (embeddings) to {m['layers'] - 1} (last layer excluded, as in the paper): "
        f"{t1['pairs_per_trajectory']} pairs per trajectory; fair-coin null for a sequence: "
        f"{t1['null_sequence_percent']:.2g}%. Two trajectory units: {result['norms']['per_sample']['unit']} "
        f"({one['trajectories']}), and every studied token of the kept samples ({t1['trajectories']}). With the last "
        f"layer included: {result['norms']['per_sample']['with_last_layer']['sequence_percent']:.1f}% / "
        f"{result['norms']['with_last_layer']['sequence_percent']:.1f}% sequences, "
        f"{result['norms']['per_sample']['with_last_layer']['pair_percent']:.1f}% / "
        f"{result['norms']['with_last_layer']['pair_percent']:.1f}% pairs (one per sample / every token).",
        "",
        "Non-decreasing pairs by step (state i -> i+1, every studied token), %: "
        + ", ".join(f"{i}: {v:.0f}" for i, v in enumerate(t1["pair_percent_by_step"])) + ".",
        "",
        *_table1(result, paper),
        "",
        f"![norms]({files['norms']})",
        "",
        "## PCA trajectories (cf. paper Figures 5 and 8)",
        "",
        f"{result['pca']['unit'].capitalize()}, {len(result['pca']['samples'])} random kept samples; explained variance "
        + ", ".join(f"{v:.2f}" for v in result["pca"]["explained_variance_ratio"]) + ".",
        "",
        f"![pca]({files['pca']})",
        "",
        "## Appendix B: linearised layer and Proposition 1",
        "",
        *_linear_lines(result["linear"]),
    ]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir) -> dict:
    """results.json, inner_loss.png, norms.png, pca_trajectories.png and summary.md in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paper = paper_numbers()
    files = _figures(result, out)
    result = {**result, "paper": {
        "source": str(paper_numbers_path()),
        "table1_nondecreasing_norm_percent": paper["table1_nondecreasing_norm_percent"],
        "table3_after_filtering_loss_gt_10": paper["table3_after_filtering_loss_gt_10"]}, "files": files}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "summary.md").write_text(markdown(result, files, paper))
    return {**files, "json": "results.json", "summary": "summary.md"}
