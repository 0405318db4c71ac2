"""Every qualitative claim of paper-numbers.json, judged when the report is written.

The synthetic-run claims (Figures 1/9, 2/11, 3/10 on the Table 5 run, Figure 6 on the Table 6 run) are
judged by metaclm_ext.analyze.claims on the analyze stage's analysis.json, read at report time, so a
rebuilt report applies the current rule without rerunning a stage. The claims about pretrained LMs
(Figures 4/7, Table 1 with Figures 5/8) and Appendix B are judged here on the stages' headline numbers with
the same Check / verdict rules: over the substantive checks, every one passed = reproduced, at least half
= partly reproduced, fewer = not reproduced, none possible = not tested; context checks are never counted.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..analyze.claims import CLAIMS, SEQUENCE_MARGIN, UNTESTED, Check, judge, verdict
from ..layer_trend import FALLING_RHO
from ..paper import paper_numbers
from ..probe.corpora import PAPER_CORPUS_NAMES
from ..probe.lens import layer_trend
from .stages import PROBE_COLUMNS

ANALYZED = {"Fig 1/9": "analyze_table5", "Fig 2a/11a": "analyze_table5", "Fig 2b/11b": "analyze_table5",
            "Fig 3/10": "analyze_table5", "Fig 6": "analyze_table6"}
CLAIM_IDS = {figure: cid for cid, figure, _ in CLAIMS}
ANALYSIS_FILE = "analysis.json"


def model_name(head: dict) -> str:
    """A probe stage's model without its parenthesised details (``SmolLM2-135M-Instruct``)."""
    return head["model"]["description"].split(" (")[0]


def _probe_name(head: dict, stage: str) -> str:
    return f"{model_name(head)} on {head['corpus']['description']} ({stage})"


def _curve_checks(name: str, curve: dict, judged: bool) -> list[Check]:
    """A loss curve's checks from layer 1 on. Substantive (when ``judged``): the last layer below layer 1 and a
    falling rank trend. Context always: last layer < embeddings (with a tied LM head the embedding state
    scores the current token, not the next, so any trained model passes), and the
    count of non-rising layer steps (the paper claims a falling trend, not a fall at every step: a rule
    needing all steps would fail curves the paper's Figure 4 calls decreasing, so it is printed, not counted)."""
    mean = curve["mean"]
    rho = layer_trend(mean)
    steps = sum(b <= a for a, b in zip(mean[1:], mean[2:]))
    label = f"{name}, {curve['label']}"
    return [
        Check(f"{label}: last layer {mean[-1]:.3f} < layer 1 {mean[1]:.3f} nats", mean[-1] < mean[1], judged),
        Check(f"{label}: falling trend over layers 1..{len(mean) - 1}, Spearman rho {rho:.2f} <= {FALLING_RHO:g}",
              rho <= FALLING_RHO, judged),
        Check(f"{label}: last layer {mean[-1]:.3f} < embeddings {mean[0]:.3f} nats", mean[-1] < mean[0], False),
        Check(f"{label}: does not rise at {steps} of {len(mean) - 2} layer steps 1..L (all would be needed for "
              "a fall at every step, which the paper does not claim)", steps == len(mean) - 2, False),
    ]


def real_lm_inner_loss_checks(probes: dict) -> list[Check]:
    """Figures 4/7, judged from layer 1 on. The judged curve is Eq. 9's: the LM head applied to each layer's
    z directly (Section 5: "feed the current token representation of each layer to the linear LM head"; no
    final norm is named); the logit lens (final norm first) is printed beside it as context."""
    checks = []
    for stage, head in probes.items():
        name = _probe_name(head, stage)
        checks += _curve_checks(name, head["inner_loss_head_only"], True)
        checks += _curve_checks(name, head["inner_loss"], False)
    return checks


def real_lm_norm_checks(probes: dict) -> list[Check]:
    """Table 1 / Figures 5/8, last layer excluded as in Table 1. Judged on one trajectory per sample (its last
    studied token): Table 1 is "for the majority of samples" and Figures 5/8 draw one path per sample. Pair
    and sequence levels at least the paper's lowest on that corpus. Context: the same on every studied token,
    and the sequence level above 10 x the 2^-n null (2^-29 = 1.9e-7 % for SmolLM2's 29 pairs: any model
    passes)."""
    table = paper_numbers()["table1_nondecreasing_norm_percent"]
    checks = []
    for stage, head in probes.items():
        column = PROBE_COLUMNS[stage]
        paper = [cols[column] for model, cols in table.items() if model != "note"]
        low_pair, low_seq = min(p["pair"] for p in paper), min(p["sequence"] for p in paper)
        name, corpus = _probe_name(head, stage), PAPER_CORPUS_NAMES[column]
        units = ((head["norms"]["per_sample"]["table1"], "one per sample", True),
                 (head["norms"]["table1"], "every studied token", False))
        for t1, unit, judged in units:
            checks += [
                Check(f"{name}, {unit}: pair level {t1['pair_percent']:.1f}% >= the paper's lowest on {corpus} "
                      f"({low_pair}%)", t1["pair_percent"] >= low_pair, judged),
                Check(f"{name}, {unit}: sequence level {t1['sequence_percent']:.1f}% >= the paper's lowest on "
                      f"{corpus} ({low_seq}%)", t1["sequence_percent"] >= low_seq, judged),
            ]
        t1 = units[0][0]
        checks.append(Check(f"{name}, one per sample: sequence level {t1['sequence_percent']:.1f}% > "
                            f"{SEQUENCE_MARGIN:g} x the 2^-{t1['pairs_per_trajectory']} null "
                            f"({t1['null_sequence_percent']:.2g}%)",
                            t1["sequence_percent"] > SEQUENCE_MARGIN * t1["null_sequence_percent"], False))
    return checks


def appendix_b_checks(synthetic: dict | None, probes: dict) -> tuple[list[Check], list[str]]:
    """Proposition 1 must hold for every (sample, layer) pair tested; models without W_linear are noted."""
    checks, notes = [], []
    if synthetic is not None:
        checks.append(Check(f"{synthetic['model']}, current token {synthetic['current_token']}: "
                            f"{synthetic['satisfied_percent']:.1f}% of {synthetic['pairs']} (sample, layer) pairs "
                            "(100% needed)", synthetic["satisfied_percent"] == 100.0))
    for stage, head in probes.items():
        lin = head["linear"]
        if lin["applicable"]:
            checks.append(Check(f"{_probe_name(head, stage)}, current token {lin['current_token']}: "
                                f"{lin['satisfied_percent']:.1f}% of {lin['pairs']} (sample, layer) pairs "
                                "(100% needed)", lin["satisfied_percent"] == 100.0))
        else:
            notes.append(f"{_probe_name(head, stage)}: not applicable ({lin['reason']})")
    return checks, notes


def _analysed_claim(out: Path, stage: str, figure: str, analyses: dict) -> dict:
    """{verdict, checks, notes} of ``figure`` judged now on OUT/stages/<stage>/analysis.json (read once per
    stage into ``analyses``); "could not be judged" in notes when the file is missing or unreadable."""
    if stage not in analyses:
        path = out / "stages" / stage / ANALYSIS_FILE
        try:
            analyses[stage] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            analyses[stage] = f"could not be judged: {path} cannot be read ({type(exc).__name__})"
    analysis = analyses[stage]
    if isinstance(analysis, str):
        return {"notes": [analysis]}
    try:
        judged = judge(analysis, only={CLAIM_IDS[figure]})[0]
    except (KeyError, IndexError, TypeError) as exc:  # an analysis.json of another layout
        return {"notes": [f"could not be judged: {stage}/{ANALYSIS_FILE} lacks {exc}"]}
    return {k: judged[k] for k in ("verdict", "checks", "notes")}


def norm_drop_notes(cause: dict | None) -> list[str]:
    """The measured cause of Table 1's sequence level (stage table1_cause), beside the verdict; never counted."""
    if cause is None:
        return []
    worst = cause["worst_steps"][0]
    removed = [r for r in cause["removal"] if r["removed"]]
    without = "; ".join(f"without dims {', '.join(map(str, r['dims']))}: {r['sequence_percent']:.1f}% / "
                        f"{r['pair_percent']:.1f}%" for r in removed[:2])
    sublayer = {"mlp": "its MLP", "attention": "its attention", None: "no token"}[worst["cause"]]
    return [f"cause (stage table1_cause, {model_name(cause)}, every studied token; see 'Table 1 explained'): the "
            f"worst step {worst['from_state']}->{worst['to_state']} keeps {worst['nondecreasing_percent']:.1f}% of "
            f"tokens ({sublayer} drops the norm most); {without} (sequence / pair)"]


def judge_all(records: dict, out) -> list[dict]:
    """[{figure, claim, verdict, checks, notes, stages}] for every claim in paper-numbers.json, in its order;
    ``out`` is the reproduce folder whose stages/<analyze stage>/analysis.json the synthetic claims are judged on."""
    folder = Path(out)
    analyses: dict = {}
    done = {n: r["headline"] for n, r in records.items() if r["status"] == "done"}
    probes = {n: done[n] for n in PROBE_COLUMNS if n in done}
    own = {
        "Fig 4/7": (lambda: (real_lm_inner_loss_checks(probes), []), list(PROBE_COLUMNS)),
        "Table 1 / Fig 5/8": (lambda: (real_lm_norm_checks(probes), norm_drop_notes(done.get("table1_cause"))),
                              list(PROBE_COLUMNS)),
        "Appendix B": (lambda: appendix_b_checks(done.get("appendix_b"), probes), ["appendix_b", *PROBE_COLUMNS]),
    }
    out = []
    for text in paper_numbers()["qualitative_claims"]:
        figure = text.split(":")[0]
        entry = {"figure": figure, "claim": text, "verdict": UNTESTED, "checks": [], "notes": []}
        if figure in ANALYZED:
            stage = ANALYZED[figure]
            entry["stages"] = [stage]
            if stage in done:
                entry.update(_analysed_claim(folder, stage, figure, analyses))
        elif figure in own:
            judge_own, stages = own[figure]
            entry["stages"] = stages
            try:
                checks, notes = judge_own()
                entry.update(verdict=verdict(checks), checks=[c._asdict() for c in checks], notes=notes)
            except KeyError as exc:  # a stage record of another layout
                entry["notes"].append(f"could not be judged: the stage records lack {exc}")
        else:
            entry["stages"] = []
            entry["notes"].append("no stage of metaclm reproduce tests this claim")
        missing = [s for s in entry["stages"] if s not in done]
        if missing:
            entry["notes"].append(f"stage(s) {', '.join(missing)} not done in this output folder")
        out.append(entry)
    return out
