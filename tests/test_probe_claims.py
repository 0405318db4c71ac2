"""The verdict rules for the pretrained-LM claims (Figures 4/7, Table 1 with Figures 5/8, Appendix B) on
hand-built stage headlines: which checks count (substantive) and which are printed only (context)."""
import pytest

from metaclm_ext.analyze.claims import NOT, PARTLY, REPRODUCED, verdict
from metaclm_ext.paper import paper_numbers
from metaclm_ext.reproduce.claims import (FALLING_RHO, appendix_b_checks, real_lm_inner_loss_checks,
                                          real_lm_norm_checks)


def _curve(mean: list, label: str) -> dict:
    return {"label": label, "mean": mean}


def _head(head_only: list, lens: list, per_sample=(80.0, 99.0), every_token=(5.0, 90.0), pairs=29) -> dict:
    def t1(seq_pair):
        return {"sequence_percent": seq_pair[0], "pair_percent": seq_pair[1], "pairs_per_trajectory": pairs,
                "null_sequence_percent": 100.0 * 2.0 ** -pairs}
    return {"model": {"description": "Model-X (details)"}, "corpus": {"description": "a stand-in"},
            "inner_loss_head_only": _curve(head_only, "head only"), "inner_loss": _curve(lens, "lens"),
            "norms": {"table1": t1(every_token), "per_sample": {"table1": t1(per_sample)}},
            "linear": {"applicable": False, "reason": "gated FFN"}}


FALLING = [100.0, 9.0, 8.0, 8.5, 6.0, 5.0, 4.0]     # one bump: falls overall
RISING = [100.0, 4.0, 5.0, 6.0, 5.5, 7.0, 9.0]      # below the embeddings, but rising from layer 1


def test_inner_loss_is_judged_on_eq9_from_layer_1():
    checks = real_lm_inner_loss_checks({"probe_wikipedia": _head(FALLING, RISING)})
    judged = [c for c in checks if c.substantive]
    assert len(judged) == 2 and all("head only" in c.what for c in judged)   # only Eq. 9's curve counts
    assert all(c.passed for c in judged) and verdict(checks) == REPRODUCED
    # Context: the bump fails "every step", the lens curve rises: printed, never counted.
    assert any(not c.passed for c in checks if not c.substantive)
    checks = real_lm_inner_loss_checks({"probe_wikipedia": _head(RISING, FALLING)})
    assert verdict(checks) == NOT
    below_embeddings = [c for c in checks if "< embeddings" in c.what and "head only" in c.what]
    assert below_embeddings[0].passed and not below_embeddings[0].substantive   # passes for any trained model


def test_trend_threshold_is_the_documented_one():
    assert FALLING_RHO == -0.5
    flat_end = [100.0, 9.0, 8.0, 7.0, 9.5, 9.2, 8.9]   # last < layer 1 but no fall: rho = +0.26
    checks = real_lm_inner_loss_checks({"probe_news": _head(flat_end, flat_end)})
    judged = [c for c in checks if c.substantive]
    assert [c.passed for c in judged] == [True, False] and verdict(checks) == PARTLY


def test_table1_judges_one_trajectory_per_sample():
    low = {c: min(cols[c]["sequence"] for m, cols in paper_numbers()["table1_nondecreasing_norm_percent"].items()
                  if m != "note") for c in ("wikitext103", "1bw")}
    checks = real_lm_norm_checks({"probe_wikipedia_gemma3": _head(FALLING, FALLING, per_sample=(low["wikitext103"], 99.5))})
    judged = [c for c in checks if c.substantive]
    assert len(judged) == 2 and all("one per sample" in c.what for c in judged) and verdict(checks) == REPRODUCED
    # every token (5%) and the null check are context
    assert {c.passed for c in checks if not c.substantive} == {True, False}
    null = [c for c in checks if "null" in c.what][0]
    assert not null.substantive and null.passed
    checks = real_lm_norm_checks({"probe_news": _head(FALLING, FALLING, per_sample=(low["1bw"] - 0.1, 99.5))})
    assert verdict(checks) == PARTLY


def test_appendix_b_names_model_and_current_token():
    synthetic = {"model": "synthetic model X", "current_token": "the last token (<eos>)", "satisfied_percent": 99.0,
                 "pairs": 12}
    checks, notes = appendix_b_checks(synthetic, {"probe_news": _head(FALLING, FALLING)})
    assert len(checks) == 1 and "synthetic model X" in checks[0].what and "<eos>" in checks[0].what
    assert not checks[0].passed and verdict(checks) == NOT
    assert notes == ["Model-X on a stand-in (probe_news): not applicable (gated FFN)"]


@pytest.mark.parametrize("missing, judge", [("inner_loss_head_only", real_lm_inner_loss_checks),
                                            ("norms", real_lm_norm_checks)])
def test_a_record_without_the_new_numbers_raises_keyerror(missing, judge):
    """judge_all turns a KeyError into "could not be judged" (old stage records): it must be a KeyError."""
    head = _head(FALLING, FALLING)
    del head[missing]
    with pytest.raises(KeyError):
        judge({"probe_news": head})
