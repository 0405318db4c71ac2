"""The stages of `metaclm reproduce`, their settings at both scales, and what each one keeps for the report.

Every stage calls the library function that the matching subcommand calls (data, train, dualcheck, analyze,
knn, probe, Appendix B), writes that function's usual outputs into its own folder, and returns a small
*headline* dict (plain JSON) that the report is written from, so REPORT.md can be rebuilt from the
stage.json files alone.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

from .. import data
from ..analyze import AnalyzeConfig, analyze_run
from ..analyze import report as analysis_report
from ..dualcheck import dualcheck, format_report
from ..finetune import FinetuneConfig, finetune
from ..finetune import report as finetune_report
from ..finetune.exactness import check_run
from ..finetune.same_article import AnalysisConfig, same_article_analysis
from ..knn import evaluate_run
from ..paper import paper_numbers
from ..probe import norm_drops_report
from ..probe import report as probe_report
from ..probe.linear import synthetic_run
from ..probe.norm_drops_run import run_norm_drops
from ..probe.run import ProbeConfig, run_probe
from ..recording import format_report as format_store_report
from ..training import load_run, make_config
from ..training.loop import train

_T5, _T6 = (paper_numbers()[k]["epochs"] for k in ("table5_training_section5", "table6_training_section8_1"))


def _probe_settings(corpus: str, model: str, samples: tuple = (48, 500)) -> dict:
    return {"model": (model, model), "corpus": (corpus, corpus), "max_samples": samples,
            "batch_size": (8, 8), "max_tokens": (128, 128), "pca_samples": (24, 50), "linear_samples": (50, 50),
            "seed": (0, 0), "device": (None, None)}


# stage -> setting -> (quick, paper): the one table both scales are read from (REPORT.md prints it). The
# paper column is the paper's setting (Tables 5 and 6 via the train presets and paper-numbers.json) except
# where the paper's size would take too long on a CPU: 500 probe samples per corpus, not 2,279 / 5,000, and 100 for
# Gemma-3-270M, whose 262,144-word head scores every studied token at every state for both inner-loss curves
# (about 3x SmolLM2's CPU time per sample: an hour per 500-sample stage on 2 cores). The
# quick column trades epochs, checkpoints and samples for a run of minutes on 2 CPU cores.
SETTINGS: dict[str, dict[str, tuple]] = {
    "data": {"seed": (0, 0)},
    "train_table5": {
        "preset": ("table5", "table5"), "epochs": (30, _T5), "max_train_sequences": (None, None),
        "max_validation_sequences": (None, None), "checkpoint_every": (1, 1), "record_history": (True, True),
        "record_errors": (True, True), "history_dtype": ("float16", "float32"), "device": ("auto", "auto"),
    },
    "dualcheck_table5": {"max_sequences": (None, None)},
    "analyze_table5": {
        "every": (3, 1), "parts": (["attention", "clustering", "inner_loss", "norms"],) * 2, "k": (10, 10),
        "kmeans_init": (2, 4), "seed": (0, 0), "device": ("auto", "auto"),
    },
    "train_table6": {
        "preset": ("table6", "table6"), "epochs": (24, _T6), "max_train_sequences": (500, None),
        "max_validation_sequences": (None, None), "checkpoint_every": (2, 5), "record_history": (False, False),
        "record_errors": (False, False), "history_dtype": ("float16", "float16"), "device": ("auto", "auto"),
    },
    "analyze_table6": {
        "every": (1, 1), "parts": (["clustering", "inner_loss", "norms"],) * 2, "k": (10, 10),
        "kmeans_init": (2, 4), "seed": (0, 0), "device": ("auto", "auto"),
    },
    "knn_table5": {"k": (16, 16), "metric": ("l2", "l2"), "kind": ("flat", "flat")},
    "probe_wikipedia": _probe_settings("wikipedia", "smollm2"),
    "probe_news": _probe_settings("news", "smollm2"),
    "probe_wikipedia_gemma3": _probe_settings("wikipedia", "gemma3-270m", samples=(16, 100)),
    "probe_news_gemma3": _probe_settings("news", "gemma3-270m", samples=(16, 100)),
    # Why Table 1's sequence level is what it is: the tokens of probe_wikipedia (same model, corpus, samples).
    "table1_cause": {k: v for k, v in _probe_settings("wikipedia", "smollm2").items()
                     if k not in ("pca_samples", "linear_samples")},
    "appendix_b": {"epoch": (None, None), "max_samples": (50, 200)},
    # Beyond the paper: `metaclm finetune` at its defaults in --paper; in --quick 2 steps of 2 x 64 tokens
    # recording 3 layers (a minute or two on 2 CPU cores, mostly loading and saving the model).
    "finetune_lm": {
        "model": ("smollm2", "smollm2"), "corpus": ("wikipedia", "wikipedia"), "tokens": (256, 50_000),
        "seq_len": (64, 128), "batch_size": (2, 4), "lr": (0.01, 0.01), "layers": ("0,mid,-1", "all"),
        "fp32_layers": ("0,-1", "0,mid,-1"), "checkpoints": (2, 4), "document_tokens": (128, 1024),
        "max_queries": (32, 256), "dualcheck_queries": (32, 256),
    },
}
SCALES = ("quick", "paper")
# the paper column each probe stage stands in for; both stand-in models on both corpora
PROBE_COLUMNS = {"probe_wikipedia": "wikitext103", "probe_news": "1bw",
                 "probe_wikipedia_gemma3": "wikitext103", "probe_news_gemma3": "1bw"}


class Context(NamedTuple):
    """What a stage may read: every stage's folder (it reads those of the stages it needs), progress bars or not."""
    stage_dirs: dict
    progress: bool

    def run_dir(self, stage: str) -> Path:
        return self.stage_dirs[stage] / "run"


def _data(ctx: Context, cfg: dict, out: Path) -> dict:
    sizes = {}
    for setting in data.SETTINGS:
        generated = data.generate(setting, cfg["seed"])
        data.write(generated, out / setting)
        sizes[setting] = {"train": len(generated["train"]), "validation": len(generated["validation"]),
                          "seeds": generated["meta"]["num_seeds"]}
        print(data.table2(generated))
    return {"sizes": sizes}


def _train(ctx: Context, cfg: dict, out: Path) -> dict:
    cfg = dict(cfg)
    preset, record = cfg.pop("preset"), cfg.pop("record_history")
    run_dir = out / "run"
    data_seed = json.loads((ctx.stage_dirs["data"] / "small" / "meta.json").read_text())["rng_seed"]
    tc = make_config(preset, **cfg, data_seed=data_seed,
                     record_history=str((run_dir / "history").resolve()) if record else None)
    summary = train(tc, run_dir, data_dir=ctx.stage_dirs["data"] / tc.data_setting, progress=ctx.progress)
    run = load_run(run_dir)
    return {"config": asdict(tc), "summary": summary, "train_sequences": len(run.data["train"]),
            "validation_sequences": len(run.data["validation"]),
            "first_losses": {k: run.losses[k][0] for k in ("train", "validation")}}


def _dualcheck(ctx: Context, cfg: dict, out: Path) -> dict:
    report = dualcheck(ctx.run_dir("train_table5"), max_sequences=cfg["max_sequences"], progress=ctx.progress)
    (out / "dualcheck.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.txt").write_text(format_report(report) + "\n")
    print(format_report(report))
    return {k: report[k] for k in ("epoch", "history_rows", "history_dtype", "optimizer", "exact_setting",
                                   "max_relative_error", "passed", "layers")}


def _analyzer(train_stage: str) -> Callable:
    """The analyze stage over ``train_stage``'s run (every N-th checkpoint and the last)."""
    def run(ctx: Context, cfg: dict, out: Path) -> dict:
        run_dir = ctx.run_dir(train_stage)
        acfg = AnalyzeConfig(every=cfg["every"], parts=tuple(cfg["parts"]), k=cfg["k"], kmeans_init=cfg["kmeans_init"],
                             seed=cfg["seed"], device=cfg["device"])
        result = analyze_run(run_dir, acfg, progress=ctx.progress)
        files = analysis_report.write_outputs(result, out)
        return _analysis_headline(result, files)
    return run


def _analysis_headline(result: dict, files: dict) -> dict:
    """The numbers of an analysis the report shows: first and last analysed checkpoint, figures (the
    claims are judged at report time on analysis.json)."""
    head = {"epochs": result["epochs"], "layers": result["layers"], "counts": result["counts"],
            "seconds": result["seconds"], "files": files,
            "outer_loss": {k: v[-1] for k, v in result["outer_loss"].items() if v}}
    if "inner_loss" in result:
        head["inner_loss"] = {s: {"first": rows[0], "last": rows[-1]} for s, rows in result["inner_loss"].items()}
    if "clustering" in result:
        head["clustering_f1"] = {s: {label: {"first": m["f1"][0], "last": m["f1"][-1]} for label, m in by.items()}
                                 for s, by in result["clustering"]["scores"].items()}
        head["clustering_k"] = result["clustering"]["k"]
    if result.get("norms"):
        head["norms"] = [{"epoch": e, **{key: {m: r[key][m] for m in ("sequence_percent", "pair_percent",
                                                                     "null_sequence_percent", "pairs")}
                                         for key in ("with_last_layer", "without_last_layer")}}
                         for e, r in zip(result["epochs"], result["norms"])]
    att = result.get("attention", {})
    if "fields" in att:
        def mean(label, side, i):
            return sum(f[label][side][i] for f in att["fields"].values()) / len(att["fields"])
        head["attention"] = {"k": att["k"], "epochs": att["epochs"], "history_rows": att["history_rows"],
                             "labels": {label: {"chance": [chance[0], chance[-1]],
                                                "top": [mean(label, "top", 0), mean(label, "top", -1)],
                                                "last": [mean(label, "last", 0), mean(label, "last", -1)]}
                                        for label, chance in att["chance"].items()}}
    elif att:
        head["attention"] = {"skipped": att["skipped"]}
    return head


def _knn(ctx: Context, cfg: dict, out: Path) -> dict:
    report = evaluate_run(ctx.run_dir("train_table5"), k=cfg["k"], metric=cfg["metric"], kind=cfg["kind"],
                          out_dir=out, progress=ctx.progress)
    return {k: report[k] for k in ("epoch", "k", "metric", "kind", "train_tokens", "validation_tokens",
                                   "model_loss", "model_accuracy", "layers")}


def _probe(ctx: Context, cfg: dict, out: Path) -> dict:
    result = run_probe(ProbeConfig(**cfg), progress=ctx.progress)
    files = probe_report.write_outputs(result, out)
    linear = {k: v for k, v in result["linear"].items() if k != "per_sample"}
    return {"model": result["model"], "corpus": result["corpus"], "counts": result["counts"],
            "inner_loss": result["inner_loss"], "inner_loss_head_only": result["inner_loss_head_only"],
            "table3_variants": result["table3_variants"],
            "norms": {k: v for k, v in result["norms"].items() if k != "mean"},
            "pca_explained": result["pca"]["explained_variance_ratio"], "pca_unit": result["pca"]["unit"],
            "linear": linear, "seconds": result["seconds"], "files": files}


def _table1_cause(ctx: Context, cfg: dict, out: Path) -> dict:
    result = run_norm_drops(ProbeConfig(**cfg), progress=ctx.progress)
    return {**result, "files": norm_drops_report.write_outputs(result, out)}


def _appendix_b(ctx: Context, cfg: dict, out: Path) -> dict:
    summary = synthetic_run(ctx.run_dir("train_table5"), cfg["epoch"], cfg["max_samples"])
    (out / "appendix_b.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {k: v for k, v in summary.items() if k != "per_sample"}


def _finetune_lm(ctx: Context, cfg: dict, out: Path) -> dict:
    cfg = dict(cfg)
    queries, checked = cfg.pop("max_queries"), cfg.pop("dualcheck_queries")
    run_dir = out / "run"
    if run_dir.exists():  # a stage rerun starts over: a run folder is never overwritten
        shutil.rmtree(run_dir)
    summary = finetune(FinetuneConfig(out=str(run_dir), **cfg), progress=ctx.progress)
    reports = check_run(run_dir, max_queries=checked)
    (out / "dualcheck.json").write_text(json.dumps(reports, indent=1) + "\n")
    print("\n\n".join(format_store_report(r) for r in reports.values()))
    result = same_article_analysis(run_dir, AnalysisConfig(max_queries=queries), progress=ctx.progress)
    files = finetune_report.write_outputs(result, out / "same-article")
    return {"model": summary["model"], "corpus": summary["corpus"], "steps": summary["steps"],
            "tokens": summary["tokens"], "rows": summary["rows"], "bytes": summary["bytes"],
            "stores": summary["stores"], "wall_seconds": summary["wall_seconds"],
            "tokens_per_second": summary["tokens_per_second"], "loss": [summary["losses"][0], summary["losses"][-1]],
            "dualcheck": {name: {k: r[k] for k in ("rows", "history_dtype", "max_relative_error", "passed", "tolerance")}
                          for name, r in reports.items()},
            "same_article": {"label": result["label"], "k": result["k"], "checkpoints": result["checkpoints"],
                             "limits": result["limits"], "queries": result["queries_per_checkpoint"],
                             "chance": {label: c[-1] for label, c in result["chance"].items()},
                             "layers": finetune_report.layer_rows(result), "seconds": result["seconds"]},
            "files": {name: f"same-article/{file}" for name, file in files.items()}}


class Stage(NamedTuple):
    name: str
    needs: tuple
    run: Callable[[Context, dict, Path], dict]
    what: str  # the paper's tables / figures it feeds


STAGES = [  # in an order that runs every stage after the stages it needs
    Stage("data", (), _data, "Table 2: synthetic small and large data"),
    Stage("train_table5", ("data",), _train, "Table 5 run (SGD, small data) with its training history"),
    Stage("dualcheck_table5", ("train_table5",), _dualcheck, "Eq. 1 dual form rebuilt from the history"),
    Stage("analyze_table5", ("train_table5",), _analyzer("train_table5"), "Figures 1-3, 9-11"),
    Stage("train_table6", ("data",), _train, "Table 6 run (Section 8.1: AdamW, cosine, large data)"),
    Stage("analyze_table6", ("train_table6",), _analyzer("train_table6"), "Figure 6"),
    Stage("knn_table5", ("train_table5",), _knn, "Section 3: the LM head as kNN over the history"),
    Stage("probe_wikipedia", (), _probe, "Tables 1, 3, Figures 4, 5 (Wikitext-103 column)"),
    Stage("probe_news", (), _probe, "Tables 1, 3, Figures 7, 8 (1BW column)"),
    Stage("probe_wikipedia_gemma3", (), _probe, "Table 1, Figures 4, 5 (Wikitext-103 column), second stand-in"),
    Stage("probe_news_gemma3", (), _probe, "Table 1, Figures 7, 8 (1BW column), second stand-in"),
    Stage("table1_cause", (), _table1_cause, "Table 1 explained: per-step norm drops, their sublayer, dominant "
          "dimensions, tolerance, removal"),
    Stage("appendix_b", ("train_table5",), _appendix_b, "Appendix B, Proposition 1"),
    Stage("finetune_lm", (), _finetune_lm, "Beyond the paper: a real LM's fine-tuning history, exact and queried"),
]
