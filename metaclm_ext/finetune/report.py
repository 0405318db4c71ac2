"""Writing the same-article analysis: same_article.json (every number), PNGs laid out like the paper's
Figure 3 (MHSA / FFN rows, top-k / last-k columns, one line per layer over the checkpoints, chance dashed),
a per-layer view at the last checkpoint, and same_article.md."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..analyze.attention import MODULES
from ..analyze.report import _legend_below, _plt, _state_colors, write_result
from ..history_names import field_name
from ..markdown import table
from .same_article import LABELS

SIDES = ("top", "last")


def label_name(result: dict, label: str) -> str:
    document = result["label"]
    return {"article": f"same {document}", "article_next_token": f"same {document} and next token",
            "next_token": "same next token"}[label]


def _layers(result: dict, kind: str) -> list[int]:
    return sorted(m["layer"] for m in result["modules"] if m["role"] == kind)


def _over_checkpoints(result: dict, label: str, path: Path) -> None:
    plt = _plt()
    steps, chance = result["checkpoints"], result["chance"][label]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, (kind, module) in enumerate(MODULES.items()):
        layers = _layers(result, kind)
        colors = _state_colors(max(len(layers), 1))
        # A legend entry for at most ~8 layers (the colours run from the first layer to the last in order).
        named = set(layers[::max(1, len(layers) // 7)]) | {layers[-1]} if layers else set()
        for col, side in enumerate(SIDES):
            ax = axes[row, col]
            for color, l in zip(colors, layers):
                ax.plot(steps, result["fields"][field_name(kind, l)][label][side], "o-", ms=2.5, lw=1, color=color,
                        label=f"layer {l + 1}" if l in named else "_nolegend_")
            ax.plot(steps, chance, "k--", lw=1, label="chance")
            ax.set_title(f"{module}: {side}-{result['k']} attended", fontsize=9)
            ax.set_ylabel(f"{label_name(result, label)} (%)")
            ax.set_xlabel("fine-tuning step (checkpoint)")
    fig.suptitle(f"Attention over the fine-tuning history, ground truth: {label_name(result, label)} (cf. paper "
                 f"Fig. 3)\n{result['model']['description'].split(' (')[0]}; {result['queries_per_checkpoint']} "
                 f"held-out queries per checkpoint, {result['history_rows']:,} history rows", fontsize=10)
    _legend_below(fig, axes[0, 0], len(axes[0, 0].get_legend_handles_labels()[1]))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _by_layer(result: dict, path: Path) -> None:
    """The last checkpoint, every layer on the x axis: readable where 30 lines over 3 checkpoints are not."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator  # matplotlib only when plotting, as in analyze.report
    fig, axes = plt.subplots(1, len(LABELS), figsize=(13, 4), sharex=True)
    for ax, label in zip(axes, LABELS):
        for kind, module in MODULES.items():
            layers = _layers(result, kind)
            for side, style in zip(SIDES, ("o-", "s:")):
                ax.plot([l + 1 for l in layers], [result["fields"][field_name(kind, l)][label][side][-1] for l in layers],
                        style, ms=3, lw=1, label=f"{module} {side}-{result['k']}")
        ax.axhline(result["chance"][label][-1], color="k", ls="--", lw=1, label="chance")
        ax.set_title(label_name(result, label), fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("%")
    fig.suptitle(f"Same-label share of the attended fine-tuning tokens per layer at step {result['checkpoints'][-1]} "
                 f"({result['limits'][-1]:,} history rows)", fontsize=10)
    _legend_below(fig, axes[0], 5)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures(result: dict, out: Path) -> dict:
    files = {f"checkpoints_{label}": f"same_article_{label}.png" for label in LABELS}
    files["layers"] = "same_article_layers.png"
    for label in LABELS:
        _over_checkpoints(result, label, out / files[f"checkpoints_{label}"])
    _by_layer(result, out / files["layers"])
    return files


def layer_rows(result: dict, label: str = "article") -> list[list]:
    """Per recorded layer at the last checkpoint: MHSA top / last, FFN top / last (percent)."""
    rows = []
    for l in sorted({m["layer"] for m in result["modules"]}):
        cells = [result["fields"][field_name(kind, l)][label][side][-1] if field_name(kind, l) in result["fields"]
                 else float("nan") for kind in MODULES for side in SIDES]
        rows.append([l + 1, *(f"{v:.1f}" for v in cells)])
    return rows


def markdown(result: dict, files: dict) -> str:
    doc, k = result["label"], result["k"]
    lines = [f"# Attention over a real LM's fine-tuning history: same {doc}?", "",
             f"- model: {result['model']['description']}", f"- corpus: {result['corpus']['description']}",
             f"- checkpoints (fine-tuning steps): {', '.join(map(str, result['checkpoints']))}; history rows up to "
             f"each: {', '.join(f'{n:,}' for n in result['limits'])} ({', '.join(result['history_dtype'])})",
             f"- queries: {result['queries_per_checkpoint']} held-out positions per checkpoint from "
             f"{result['heldout_sentences']} held-out sentences of {result['query_articles']} {doc}s",
             f"- seconds: {result['seconds']['forward']:.0f} forward, {result['seconds']['attention']:.0f} "
             f"history_topk, {result['seconds']['total']:.0f} in all", ""]
    chance = {label: result["chance"][label][-1] for label in LABELS}
    summary = []
    for label in LABELS:
        for kind, module in MODULES.items():
            fields = [field_name(kind, l) for l in _layers(result, kind)]
            for side in SIDES:
                values = np.array([result["fields"][f][label][side][-1] for f in fields])
                summary.append([label_name(result, label), module, f"{side}-{k}", f"{np.nanmean(values):.1f}",
                                f"{np.nanmin(values):.1f}", f"{np.nanmax(values):.1f}", f"{chance[label]:.1f}"])
    lines += [f"## At the last checkpoint (step {result['checkpoints'][-1]}), over the recorded layers", "",
              *table(["ground truth", "module", "attended", "mean %", "min %", "max %", "chance %"], summary), "",
              f"## Same {doc}, per layer (last checkpoint; chance {chance['article']:.1f}%; layers numbered from 1)",
              "",
              *table(["layer", f"MHSA top-{k}", f"MHSA last-{k}", f"FFN top-{k}", f"FFN last-{k}"],
                     layer_rows(result)), "", "## Figures", ""]
    lines += [f"![{name}]({file})" for name, file in files.items()]
    lines += ["", "## Method", "", " ".join(result["choices"].split())]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir) -> dict:
    """same_article.json, the PNG figures and same_article.md in ``out_dir``; returns {name: file}."""
    return write_result(result, out_dir, figures, markdown, "same_article.json", "same_article.md")
