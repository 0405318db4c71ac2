"""Writing an analysis: analysis.json (every number), PNG figures laid out like the paper's, summary.md."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..history_names import field_name
from ..markdown import table
from .attention import LABELS, MODULES
from .claims import QUERY_TOKEN, tally
from .clustering import METRICS

LABEL_NAMES = {"seed": "seed", "next_token": "next token", "seed_next_token": "seed-next-token"}
FIGURE_OF_LABEL = {"seed": "Fig. 3", "seed_next_token": "Fig. 10", "next_token": "Fig. 10 (next token)"}


def _plt():
    import matplotlib  # when plotting: pyplot would add half a second to every `metaclm` start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator  # matplotlib only when plotting, as in _plt

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _state_colors(n: int):
    return _plt().get_cmap("viridis")(np.linspace(0, 0.9, n))


def _legend_below(fig, ax, ncol: int) -> None:
    """One legend for all panels, under them, so it hides no data."""
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))


def _state_name(s: int) -> str:
    return "emb" if s == 0 else f"L{s}"


def _attention_figure(result: dict, label: str, path: Path) -> None:
    plt = _plt()
    att = result["attention"]
    epochs, chance = att["epochs"], att["chance"][label]
    layers = result["layers"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    colors = _state_colors(layers)
    for row, (kind, module) in enumerate(MODULES.items()):
        for col, side in enumerate(("top", "last")):
            ax = axes[row, col]
            for l in range(layers):
                ax.plot(epochs, att["fields"][field_name(kind, l)][label][side], "o-", ms=2.5, lw=1, color=colors[l],
                        label=f"layer {l + 1}")
            ax.plot(epochs, chance, "k--", lw=1, label="chance")
            ax.set_title(f"{module}: {side}-{att['k']} attended", fontsize=9)
            ax.set_ylabel(f"same {LABEL_NAMES[label]} (%)")
            _epoch_axis(ax)
    fig.suptitle(f"Attention over the history, ground truth: {LABEL_NAMES[label]} (cf. paper {FIGURE_OF_LABEL[label]})\n"
                 f"{att['queries_per_epoch']} validation queries per checkpoint, {att['history_rows']:,} history rows",
                 fontsize=10)
    _legend_below(fig, axes[0, 0], layers + 1)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _clustering_figure(result: dict, rows: list[tuple[str, str]], path: Path, title: str) -> None:
    plt = _plt()
    scores, epochs = result["clustering"]["scores"], result["epochs"]
    states = result["layers"] + 1
    colors = _state_colors(states)
    fig, axes = plt.subplots(len(rows), len(LABELS), figsize=(12, 2.6 * len(rows) + 1.2), squeeze=False)
    for r, (split, metric) in enumerate(rows):
        for c, label in enumerate(LABELS):
            ax = axes[r, c]
            values = np.array(scores[split][label][metric], dtype=float)  # [epochs, states], None -> nan
            for s in range(states):
                ax.plot(epochs, values[:, s], "o-", ms=2, lw=0.9, color=colors[s], label=_state_name(s))
            k = result["clustering"]["k"].get(f"{split}/{label}")
            ax.set_title(f"{split}: {LABEL_NAMES[label]} (k={k})", fontsize=9)
            ax.set_ylabel(metric.upper())
            _epoch_axis(ax)
    fig.suptitle(title, fontsize=10)
    _legend_below(fig, axes[0, 0], states)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _loss_figure(result: dict, split: str, path: Path, figure: str) -> None:
    plt = _plt()
    rows, epochs = np.array(result["inner_loss"][split]), result["epochs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    from matplotlib.colors import ListedColormap  # matplotlib only when plotting, as in _plt

    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 0.9, 256)))  # no pale yellow end
    norm = plt.Normalize(min(epochs), max(max(epochs), min(epochs) + 1))
    for e, row in zip(epochs, rows):
        a.plot(range(len(row)), row, "o-", ms=2.5, lw=0.8, color=cmap(norm(e)))
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=norm), ax=a, label="epoch")
    a.set_xticks(range(rows.shape[1]), [_state_name(s) for s in range(rows.shape[1])])
    a.set_xlabel("layer")
    a.set_ylabel("inner loss (nats)")
    a.set_title(f"(a) inner loss across layers and epochs, {split} tokens", fontsize=9)
    outer = result["outer_loss"]
    if outer.get(split):
        b.plot(outer["epoch"], outer[split], "-", color="black", label=f"{split} loss (outer)")
    _epoch_axis(b)
    b.set_ylabel("loss (nats)")
    b.set_title("(b) outer loss along training", fontsize=9)
    b.legend(fontsize=8)
    fig.suptitle(f"Bi-level optimisation (cf. paper {figure})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _norms_figure(result: dict, path: Path) -> None:
    plt = _plt()
    epochs, rows = result["epochs"], result["norms"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, style, name in (("with_last_layer", "-", "all layers"), ("without_last_layer", ":", "last layer excluded")):
        ax.plot(epochs, [r[key]["pair_percent"] for r in rows], "o" + style, ms=2.5, color="tab:blue",
                label=f"pair acc ({name})")
        ax.plot(epochs, [r[key]["sequence_percent"] for r in rows], "s" + style, ms=2.5, color="tab:orange",
                label=f"sequence acc ({name})")
    w = rows[0]["with_last_layer"]
    ax.axhline(50.0, color="tab:blue", ls="--", lw=0.8, label="pair null 50%")
    ax.axhline(w["null_sequence_percent"], color="tab:orange", ls="--", lw=0.8,
               label=f"sequence null 2^-{w['pairs']} = {w['null_sequence_percent']:.2f}%")
    _epoch_axis(ax)
    ax.set_ylabel("non-decreasing norms (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"Non-decreasing norm trajectories along training, {rows[0]['tokens']} validation tokens "
                 "(cf. paper Fig. 6)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures(result: dict, out: Path) -> dict:
    files = {}
    if "fields" in result.get("attention", {}):
        for label in LABELS:
            files[f"attention_{label}"] = f"attention_{label}.png"
            _attention_figure(result, label, out / files[f"attention_{label}"])
    if "clustering" in result:
        files["clustering_f1"] = "clustering_f1.png"
        _clustering_figure(result, [("validation", "f1")], out / files["clustering_f1"],
                           "KMeans clustering of the query token, validation set, F1 (cf. paper Fig. 1)")
        files["clustering_all"] = "clustering_all.png"
        _clustering_figure(result, [(s, m) for s in ("train", "validation") for m in METRICS],
                           out / files["clustering_all"], "KMeans clustering, train and validation, F1 / ARI / AMI "
                           "(cf. paper Fig. 9)")
    if "inner_loss" in result:
        for split, figure in (("train", "Fig. 2"), ("validation", "Fig. 11")):
            files[f"inner_loss_{split}"] = f"inner_loss_{split}.png"
            _loss_figure(result, split, out / files[f"inner_loss_{split}"], figure)
    if result.get("norms"):
        files["norms"] = "norms.png"
        _norms_figure(result, out / files["norms"])
    return files


VERDICT_RULE = (
    "A verdict counts a claim's *substantive* checks only, those that can fail when the paper's claim is false: "
    "*reproduced* when all pass, *partly reproduced* when at least half pass, *not reproduced* otherwise, *not "
    "tested* when there is none. *Context* checks (comparisons that any model passes, such as a null far below an "
    "untrained model) are listed under each claim, marked \"context, not counted\", and never change a verdict."
)


def verdict_text(claim: dict) -> str:
    """"partly reproduced (3 of 4 substantive checks passed)"."""
    return f"{claim['verdict']} ({tally(claim['checks'])})"


def evidence_lines(claim: dict) -> list[str]:
    """The claim's substantive checks, then its context checks, then its notes, one line each."""
    checks = claim["checks"]
    counted = [c for c in checks if c.get("substantive", True)]
    context = [c for c in checks if not c.get("substantive", True)]
    return ([f"{'pass' if c['passed'] else 'FAIL'}: {c['what']}" for c in counted]
            + [f"context, not counted ({'pass' if c['passed'] else 'fail'}): {c['what']}" for c in context]
            + [f"note: {n}" for n in claim.get("notes", [])])


def _cells(values, fmt="{:.3f}") -> list[str]:
    return ["—" if v is None else fmt.format(v) for v in values]


def markdown(result: dict, files: dict) -> str:
    cfg, epochs, layers = result["preset_config"], result["epochs"], result["layers"]
    states = list(range(layers + 1))
    lines = [
        f"# metaclm analyze: {result['run']}",
        "",
        f"Run: {layers} layers, {cfg['n_head']} heads, hidden {cfg['n_embd']}, FFN {cfg['n_inner']}, {cfg['optimizer']} "
        f"lr {cfg['lr']}, {cfg['epochs']} epochs, data `{cfg['data_setting']}` ({result['counts']['train']} train / "
        f"{result['counts']['validation']} validation sequences). Analysed checkpoints: {len(epochs)} "
        f"(epochs {epochs[0]}..{epochs[-1]}). Wall time {result['seconds']['total']:.1f} s "
        f"(forward {result['seconds']['forward']:.1f} s, clustering {result['seconds']['clustering']:.1f} s, attention "
        f"{result['seconds']['attention']:.1f} s).",
        "",
        "## The paper's claims on this run",
        "",
        f"{VERDICT_RULE} Early/late = mean over the first/last tenth of the analysed checkpoints.",
        "",
    ]
    for c in result["claims"]:
        lines += [f"- **{c['figure']}: {verdict_text(c)}.** {c['claim']}"]
        lines += [f"  - {line}" for line in evidence_lines(c)]
    lines += ["", "## Choices", ""] + [f"- **{k.replace('_', ' ')}.** {' '.join(v.split())}"
                                       for k, v in result["choices"].items()]
    att = result.get("attention")
    if att is not None:
        lines += ["", "## Attention over the history (Figures 3 and 10)", ""]
        if "fields" not in att:
            lines.append(f"Not run: {att['skipped']}.")
        else:
            rows = []
            for label in LABELS:
                for kind, module in MODULES.items():
                    for side in ("top", "last"):
                        vals = [att["fields"][field_name(kind, l)][label][side][-1] for l in range(layers)]
                        rows.append([LABEL_NAMES[label], module, side, *_cells(vals, "{:.1f}"),
                                     f"{att['chance'][label][-1]:.1f}"])
            lines += [f"Top-{att['k']} / last-{att['k']} same-label percentage at the last checkpoint (epoch "
                      f"{att['epochs'][-1]}, {att['limits'][-1]:,} history rows); chance in the last column.", "",
                      *table(["label", "module", "side", *(f"L{l + 1}" for l in range(layers)), "chance"], rows)]
            lines += [""] + [f"![{LABEL_NAMES[l]}]({files['attention_' + l]})" for l in LABELS]
    if "clustering" in result:
        chance = result["clustering"].get("f1_chance")
        rows = []
        for split, by_label in result["clustering"]["scores"].items():
            for label, metrics in by_label.items():
                rows += [[split, LABEL_NAMES[label], metric.upper(), *_cells(metrics[metric][-1])] for metric in METRICS]
                if chance is not None:
                    rows.append([split, LABEL_NAMES[label], f"F1 chance ({chance['quantile']:.0%} quantile)",
                                 *_cells(chance["scores"][split][label]["quantile"])])
        null = "" if chance is None else (
            f" F1 chance: the same clusters scored against {chance['permutations']} permutations of the labels, the "
            f"{chance['quantile']:.0%} quantile (a random clustering's F1 is well above 1/k after the matching).")
        lines += ["", "## Clustering (Figures 1 and 9)", "", "F1 / ARI / AMI at the last checkpoint per state of the "
                  f"query token ({QUERY_TOKEN}; emb = embedding output, Ll = block l's output before "
                  f"ln_f).{null}", "", *table(["split", "label", "metric", *(_state_name(s) for s in states)], rows)]
        lines += ["", f"![F1]({files['clustering_f1']})", "", f"![all]({files['clustering_all']})"]
    if "inner_loss" in result:
        shown = sorted({0, len(epochs) // 2, len(epochs) - 1})
        rows = [[split, epochs[i], *_cells(losses[i])] for split, losses in result["inner_loss"].items() for i in shown]
        lines += ["", "## Inner loss (Figures 2 and 11)", "",
                  *table(["split", "epoch", *(_state_name(s) for s in states)], rows)]
        lines += ["", f"![train]({files['inner_loss_train']})", "", f"![validation]({files['inner_loss_validation']})"]
    if result.get("norms"):
        first, last = result["norms"][0], result["norms"][-1]
        rows = []
        for e, r in ((epochs[0], first), (epochs[-1], last)):
            w, wo = r["with_last_layer"], r["without_last_layer"]
            rows.append([e, f"{w['pair_percent']:.1f}", f"{w['sequence_percent']:.1f}", f"{wo['pair_percent']:.1f}",
                         f"{wo['sequence_percent']:.1f}"])
        lines += ["", "## Norm trajectories (Figure 6)", "",
                  *table(["epoch", "pair %", "sequence %", "pair % (no last layer)", "sequence % (no last layer)"],
                         rows)]
        lines += ["", f"Null: pair 50%, sequence {last['with_last_layer']['null_sequence_percent']:.2f}% "
                  f"({last['with_last_layer']['pairs']} pairs).", "", f"![norms]({files['norms']})"]
    return "\n".join(lines) + "\n"


def write_result(result: dict, out_dir, make_figures, make_markdown, json_name: str, summary_name: str) -> dict:
    """``make_figures(result, out)`` -> {name: file}, then the result with its files as ``json_name`` and
    ``make_markdown(result, files)`` as ``summary_name`` in ``out_dir``; returns {name: file}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = make_figures(result, out)
    result = {**result, "files": files}
    (out / json_name).write_text(json.dumps(result, indent=1) + "\n")
    (out / summary_name).write_text(make_markdown(result, files))
    return {**files, "json": json_name, "summary": summary_name}


def write_outputs(result: dict, out_dir) -> dict:
    """analysis.json, the PNG figures and summary.md in ``out_dir``; returns {name: file}."""
    return write_result(result, out_dir, figures, markdown, "analysis.json", "summary.md")
