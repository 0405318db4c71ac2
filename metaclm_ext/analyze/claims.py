"""The paper's qualitative claims about the synthetic runs, judged on an analysis result.

Each claim is split into checks that are plain comparisons of numbers in the result. A check is
*substantive* when it can fail if the paper's claim is false, and *context* when it passes whatever the
model does (a bound far below any trained model, a comparison with a state that cannot compete): context
checks are printed beside the verdict and never counted. Over the substantive checks, a claim is
*reproduced* when every one passes, *partly reproduced* when at least half pass, *not reproduced*
otherwise, and *not tested* when the run cannot test it (one checkpoint, a part left out). "Early" and
"late" are the means over the first and the last tenth of the analysed checkpoints (one at least): the
start and the end of training, each smoothed so that a single noisy checkpoint does not decide a trend.
The claim texts come from paper-numbers.json.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

from ..history_names import parse_field_name
from ..layer_trend import FALLING_RHO, spearman_with_order
from ..paper import paper_numbers

REPRODUCED, PARTLY, NOT, UNTESTED = "reproduced", "partly reproduced", "not reproduced", "not tested"
TREND_LABELS = ("seed", "seed_next_token")  # the ground truths Figures 3/10 judge (Section 5)
SEQUENCE_MARGIN = 10.0  # Figure 6: "far above the null" = at least this many times the null
# The state Figures 1/9 cluster and the input Figures 3/10 score, as forward.py takes them (QUERY_POSITION).
QUERY_TOKEN = "the second-to-last letter"


class Check(NamedTuple):
    what: str
    passed: bool
    substantive: bool = True  # False: context, printed and never counted in the verdict


def paper_claim(prefix: str) -> str:
    """The paper's claim text that starts with ``prefix`` (e.g. "Fig 3/10")."""
    for text in paper_numbers()["qualitative_claims"]:
        if text.startswith(prefix):
            return text
    raise KeyError(f"paper-numbers.json has no qualitative claim starting with {prefix!r}")


def verdict(checks: list[Check]) -> str:
    """The verdict over the substantive checks (context checks never lift or lower it)."""
    counted = [c for c in checks if c.substantive]
    if not counted:
        return UNTESTED
    passed = sum(c.passed for c in counted)
    return REPRODUCED if passed == len(counted) else PARTLY if 2 * passed >= len(counted) else NOT


def tally(checks: list[dict]) -> str:
    """"k of n substantive checks passed" of a judged claim's checks (dicts; a check without the
    "substantive" key, from a record written before the split, counts as substantive)."""
    counted = [c for c in checks if c.get("substantive", True)]
    return f"{sum(c['passed'] for c in counted)} of {len(counted)} substantive checks passed"


def early_late(series: list) -> tuple[float, float]:
    values = [v for v in series if v is not None and not math.isnan(v)]
    q = max(1, len(values) // 10)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def clustering_checks(result: dict) -> list[Check]:
    """All substantive. The embedding state of the query token is its letter and position, which the labels
    partly follow, and it is trained too, so "last layer > embeddings" compares with a real competitor and
    can go either way. F1 averaged over layers can fall or stay flat along training. The seed-next-token
    label has more clusters than next-token, which lowers its F1 by chance, so it beating next-token
    is no artefact. Above chance: the last layer's F1 against the quantile of its permutation null
    (clustering.chance_f1), which random representations reach only by the null's own odds."""
    if "clustering" not in result:
        return []
    scores, trend = result["clustering"]["scores"], len(result["epochs"]) > 1
    chance = result["clustering"].get("f1_chance")
    last_state = f"L{result['layers']} output of {QUERY_TOKEN}, before ln_f"
    checks = []
    for split, by_label in scores.items():
        for label, metrics in by_label.items():
            f1 = metrics["f1"]
            if f1[-1][0] is None:
                continue
            checks.append(Check(f"{split}, {label}: F1 of the last layer ({last_state}) {f1[-1][-1]:.3f} > embeddings "
                                f"{f1[-1][0]:.3f} (last checkpoint)", f1[-1][-1] > f1[-1][0]))
            if chance is not None:
                null = chance["scores"][split][label]
                q = null["quantile"][-1]
                checks.append(Check(
                    f"{split}, {label}: F1 of the last layer {f1[-1][-1]:.3f} > chance {q:.3f} (the "
                    f"{chance['quantile']:.0%} quantile of the same clusters scored against {chance['permutations']} "
                    f"label permutations; mean {null['mean'][-1]:.3f}; last checkpoint)", f1[-1][-1] > q))
            if trend:
                early, late = early_late([_mean(row) for row in f1])
                checks.append(Check(f"{split}, {label}: F1 averaged over layers rises with training "
                                    f"({early:.3f} early -> {late:.3f} late)", late > early))
        combo, nxt = by_label["seed_next_token"]["f1"][-1][1:], by_label["next_token"]["f1"][-1][1:]
        if combo[0] is not None and nxt[0] is not None:
            checks.append(Check(f"{split}: seed-next-token F1 {_mean(combo):.3f} > next-token F1 {_mean(nxt):.3f} "
                                "(layers 1..L, last checkpoint)", _mean(combo) > _mean(nxt)))
    return checks


def clustering_notes(result: dict) -> list[str]:
    if "clustering" in result and "f1_chance" not in result["clustering"]:
        return ["the above-chance checks are missing: this analysis.json has no chance F1 (written before "
                "`metaclm analyze` computed it); rerun the analysis to add them"]
    return []


def inner_loss_checks(result: dict) -> list[Check]:
    """Judged from layer 1 on. The LM head is tied to the token embeddings, so the logit lens on the
    embedding state scores the current token, not the next one: once trained it is worse than a uniform
    guess, and any last layer that learned anything beats it. That comparison is context; the substantive
    checks are the last layer below layer 1, a falling rank trend over layers 1..L (FALLING_RHO), and the
    mean over layers 1..L falling along training (the embedding state, rising as the embeddings grow,
    would pull a mean over all states the other way)."""
    if "inner_loss" not in result:
        return []
    checks = []
    for split, rows in result["inner_loss"].items():
        last = rows[-1]
        checks.append(Check(f"{split}: inner loss at the last layer {last[-1]:.3f} < embeddings {last[0]:.3f} "
                            "(last checkpoint; the tied LM head makes the embedding state predict the current "
                            "token)", last[-1] < last[0], substantive=False))
        layers = last[1:]
        if len(layers) >= 2:
            rho = spearman_with_order(layers)
            steps = sum(b <= a for a, b in zip(layers, layers[1:]))
            checks.append(Check(f"{split}: inner loss at the last layer {layers[-1]:.3f} < layer 1 {layers[0]:.3f} "
                                "(last checkpoint)", layers[-1] < layers[0]))
            checks.append(Check(f"{split}: inner loss falls across layers 1..{len(layers)}: Spearman rho "
                                f"{rho:.2f} <= {FALLING_RHO:g} (it does not rise at {steps} of {len(layers) - 1} "
                                "steps; last checkpoint)", rho <= FALLING_RHO))
        if len(rows) > 1:
            early, late = early_late([_mean(r[1:]) for r in rows])
            checks.append(Check(f"{split}: inner loss averaged over layers 1..{len(last) - 1} falls with training "
                                f"({early:.3f} early -> {late:.3f} late)", late < early))
    return checks


def outer_loss_checks(result: dict) -> list[Check]:
    """Substantive: a loss that does not fall fails."""
    checks = []
    for split in ("train", "validation"):
        series = result["outer_loss"].get(split, [])
        if len(series) > 1:
            early, late = early_late(series)
            checks.append(Check(f"{split} loss falls with training ({early:.3f} early -> {late:.3f} late)", late < early))
    return checks


def _pair_name(field: str) -> str:
    name = parse_field_name(field)
    return f"{'MHSA' if name.module == 'attn' else 'FFN'} L{name.layer + 1}"


def attention_checks(result: dict) -> list[Check]:
    """Substantive: the chance level is measured on each query's own history, and a layer must beat it at
    the end and move the right way along training, which attention unrelated to the label does not."""
    att = result.get("attention", {})
    if "fields" not in att or len(att["epochs"]) < 2:
        return []
    query = f"queries: each block's c_proj inputs at {QUERY_TOKEN} of every validation sequence"
    checks = []
    for label in TREND_LABELS:
        chance = att["chance"][label][-1]
        top_ok, last_ok = [], []
        for field, per_label in att["fields"].items():
            top, last = per_label[label]["top"], per_label[label]["last"]
            (top_early, top_late), (last_early, last_late) = early_late(top), early_late(last)
            if top[-1] > chance and top_late > top_early:
                top_ok.append(_pair_name(field))
            if last[-1] < chance and last_late < last_early:
                last_ok.append(_pair_name(field))
        n = len(att["fields"])
        checks.append(Check(f"{label}: top-{att['k']} above chance ({chance:.1f}%) at the last checkpoint and rising with "
                            f"training in {len(top_ok)} of {n} layers/modules (most needed; {query}): "
                            f"{', '.join(top_ok) or 'none'}", 2 * len(top_ok) > n))
        checks.append(Check(f"{label}: last-{att['k']} below chance and falling in {len(last_ok)} of {n} layers/modules "
                            f"(most needed; {query}): {', '.join(last_ok) or 'none'}", 2 * len(last_ok) > n))
    return checks


def norm_checks(result: dict) -> list[Check]:
    """The levels' rise from the first analysed checkpoint (the initialisation) is substantive, for all
    steps and for the last layer's step alone ("the last layer also follows the trend"). Their absolute
    levels against the nulls are context: an untrained model already has most pairs non-decreasing and a
    sequence level far above 2^-n, so those comparisons pass whatever training does."""
    rows = result.get("norms")
    if not rows or len(rows) < 2:
        return []
    key = "with_last_layer"
    seq = [r[key]["sequence_percent"] for r in rows]
    pair = [r[key]["pair_percent"] for r in rows]
    last_step = [r[key]["pair_percent_by_step"][-1] for r in rows]
    null = rows[0][key]["null_sequence_percent"]
    (_, seq_late), (_, pair_late), (_, last_late) = early_late(seq), early_late(pair), early_late(last_step)
    first = result["epochs"][0]  # "rise early in training": from the first analysed checkpoint (the init at 0)
    return [
        Check(f"sequence level rises from epoch {first} ({seq[0]:.1f}% -> {seq_late:.1f}% late)", seq_late > seq[0]),
        Check(f"pair level rises from epoch {first} ({pair[0]:.1f}% -> {pair_late:.1f}% late)", pair_late > pair[0]),
        Check(f"the last layer follows: its step is non-decreasing for more tokens late than at epoch {first} "
              f"({last_step[0]:.1f}% -> {last_late:.1f}%)", last_late > last_step[0]),
        Check(f"sequence level late {seq_late:.1f}% > {SEQUENCE_MARGIN:g} x the null {null:.2f}% (epoch {first}: "
              f"{seq[0]:.1f}%)", seq_late > SEQUENCE_MARGIN * null, substantive=False),
        Check(f"pair level late {pair_late:.1f}% > the null 50% (epoch {first}: {pair[0]:.1f}%)", pair_late > 50.0,
              substantive=False),
        Check(f"the last layer's step is non-decreasing for {last_late:.1f}% of tokens late (> 50%; epoch {first}: "
              f"{last_step[0]:.1f}%)", last_late > 50.0, substantive=False),
    ]


CLAIMS: list[tuple[str, str, Callable[[dict], list[Check]]]] = [
    ("clustering", "Fig 1/9", clustering_checks),
    ("inner_loss", "Fig 2a/11a", inner_loss_checks),
    ("outer_loss", "Fig 2b/11b", outer_loss_checks),
    ("attention", "Fig 3/10", attention_checks),
    ("norms", "Fig 6", norm_checks),
]


NOTES: dict[str, Callable[[dict], list[str]]] = {"clustering": clustering_notes}


def judge(result: dict, only: Optional[set] = None) -> list[dict]:
    """[{id, figure, claim, verdict, checks: [{what, passed, substantive}], notes}] for every claim
    (``only``: those ids)."""
    out = []
    for cid, figure, fn in CLAIMS:
        if only is not None and cid not in only:
            continue
        checks = fn(result)
        out.append({"id": cid, "figure": figure, "claim": paper_claim(figure), "verdict": verdict(checks),
                    "checks": [c._asdict() for c in checks], "notes": NOTES.get(cid, lambda r: [])(result)})
    return out
