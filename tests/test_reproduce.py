"""metaclm reproduce: a tiny end-to-end run (tiny training settings, a tiny random GPT-2 and a six-sentence
corpus as the probe model and corpus), resumability, failures, bad input, and the scripts in scripts/."""
import fcntl
import json
import os
import re
import runpy
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded at run time

import pytest

import probe_models
from metaclm_ext.cli import main
from metaclm_ext.paper import paper_numbers
from metaclm_ext.reproduce import SCALES, SETTINGS, STAGES, reproduce, selected_stages, stage_settings
from metaclm_ext.reproduce.run import LOCK_FILE

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PROBES = {"probe_wikipedia", "probe_news", "probe_wikipedia_gemma3", "probe_news_gemma3"}
GROUPS = {"tables_1_3.py": {"data", *PROBES, "table1_cause"},
          "figures_1_3.py": {"data", "train_table5", "analyze_table5", "dualcheck_table5", "knn_table5"},
          "figures_4_8.py": PROBES,
          "figure_6.py": {"data", "train_table6", "analyze_table6"},
          "appendix_b.py": {"data", "train_table5", "appendix_b"}}
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "not tested")


def tiny_settings(model: str, corpus: str) -> dict:
    probe = {"model": model, "corpus": corpus, "max_samples": None, "pca_samples": 4, "linear_samples": 2}
    return {
        "train_table5": {"preset": "tiny", "epochs": 3, "history_dtype": "float32"},
        "train_table6": {"epochs": 2, "max_train_sequences": 24, "max_validation_sequences": 16, "checkpoint_every": 1},
        "analyze_table5": {"every": 2, "kmeans_init": 1},
        "analyze_table6": {"parts": ["inner_loss", "norms"]},  # Figure 6 needs the norms only
        **{stage: dict(probe) for stage in PROBES},  # a tiny GPT-2 for every probe stage: no real model loaded
        "table1_cause": {"model": model, "corpus": corpus, "max_samples": None},
        "appendix_b": {"max_samples": 4},
        "finetune_lm": {"model": model, "corpus": corpus, "tokens": 64, "seq_len": 16, "fp32_layers": "0,-1",
                        "max_queries": 16, "dualcheck_queries": 16},
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(probe_models.SENTENCES) + "\n")
    settings = tiny_settings(probe_models.save("gpt2", root / "gpt2"), str(corpus))
    out = root / "out"
    result = reproduce(out, "quick", settings=settings, progress=False)
    return out, settings, result


def _copy(out: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(out, dest)
    return dest


def _mtimes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("stages/*/stage.json")}


# --- the full run and its report --------------------------------------------------------------------

def test_tiny_run_does_every_stage_and_records_it(tiny):
    out, _, result = tiny
    assert result["failed"] == []
    for s in STAGES:
        record = json.loads((out / "stages" / s.name / "stage.json").read_text())
        assert record["status"] == "done" and record["seconds"] > 0 and len(record["key"]) == 64
        assert record["settings"] == stage_settings("quick", tiny[1])[s.name]
        assert record["commit"] and record["machine"]["cores"] >= 1
    assert (out / "stages/train_table5/run/checkpoints/epoch_0003").is_dir()


def test_report_puts_the_papers_numbers_beside_ours(tiny):
    out, _, _ = tiny
    text = (out / "REPORT.md").read_text()
    report = json.loads((out / "report.json").read_text())
    paper = paper_numbers()
    # Table 1: each paper row, and our row with the number the probe stage measured.
    for model, cols in paper["table1_nondecreasing_norm_percent"].items():
        if model != "note":
            assert f"| paper: {model} | Wikitext-103 | {cols['wikitext103']['sequence']} | {cols['wikitext103']['pair']} |" in text
    ours = report["stages"]["probe_wikipedia"]["headline"]["norms"]["table1"]
    assert f"**{ours['sequence_percent']:.1f}** | **{ours['pair_percent']:.1f}**" in text
    # Table 1 explained, right after Table 1, over the same tokens: removing no dimension is Table 1's row.
    cause = report["stages"]["table1_cause"]["headline"]
    assert cause["removal"][0]["dims"] == [] and cause["counts"]["studied_tokens_kept"] == ours["trajectories"]
    assert (cause["removal"][0]["sequence_percent"], cause["removal"][0]["pair_percent"]) == \
        (ours["sequence_percent"], ours["pair_percent"])
    explained = text.index("## Table 1 explained")
    assert text.index("## Table 1:") < explained < text.index("## Table 2")
    assert f"| 0 | none (Table 1) | {ours['sequence_percent']:.1f} | {ours['pair_percent']:.1f} |" in text[explained:]
    (table1,) = [c for c in report["claims"] if c["figure"] == "Table 1 / Fig 5/8"]
    worst = cause["worst_steps"][0]
    assert any(n.startswith(f"cause (stage table1_cause") and f"{worst['from_state']}->{worst['to_state']}" in n
               for n in table1["notes"])
    # Table 2: synthetic sizes, ours from the written data beside the paper's.
    train_rows = len((out / "stages/data/small/train.jsonl").read_text().splitlines())
    assert f"| synthetic small train | **{train_rows:,}** | {paper['table2_data_sizes']['synthetic_small']['train']:,} |" in text
    # Table 3: the paper's kept counts.
    assert f"{paper['table3_after_filtering_loss_gt_10']['GPT-2']['1bw']:,} of 5,000" in text
    # The dual form is exact for the float32 SGD history.
    assert report["stages"]["dualcheck_table5"]["headline"]["passed"] is True and "**PASS**" in text
    # The fine-tuning stage comes last, apart from the paper's sections, with its exactness verdict.
    beyond = text.index("# Beyond the paper")
    assert beyond > text.index("## Settings") and "SmolLM2-135M-Instruct" in text[beyond:]
    finetuned = report["stages"]["finetune_lm"]["headline"]
    assert finetuned["dualcheck"]["history-fp32"]["passed"] is True and "**PASS** (tolerance 0.0001)" in text[beyond:]
    assert finetuned["tokens"] == 64 and len(finetuned["same_article"]["layers"]) == 3
    # Every figure the report links exists.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 12 and all((out / link).is_file() for link in links)


def test_report_judges_every_claim_of_the_paper(tiny):
    out, _, _ = tiny
    text = (out / "REPORT.md").read_text()
    claims = json.loads((out / "report.json").read_text())["claims"]
    assert [c["claim"] for c in claims] == paper_numbers()["qualitative_claims"]
    for c in claims:
        assert c["verdict"] in VERDICTS
        counted = [ch for ch in c["checks"] if ch.get("substantive", True)]
        tally = f"{sum(ch['passed'] for ch in counted)} of {len(counted)} substantive checks passed"
        assert f"| {c['claim'].replace('|', '/')} | **{c['verdict']}** ({tally}) |" in text
        if c["verdict"] != "not tested":
            assert counted, c["figure"]
    by_figure = {c["figure"]: c for c in claims}
    assert by_figure["Fig 6"]["verdict"] != "not tested"        # two checkpoints of the Table 6 run suffice
    # Figure 6's nulls are context: listed apart, in the section's claim lines and in the claims table.
    context = [ch for ch in by_figure["Fig 6"]["checks"] if not ch["substantive"]]
    assert len(context) == 3 and any("10 x the null" in ch["what"] for ch in context)
    section = text[text.index("## Figure 6:"):text.index("## Eq. 1")]
    assert "substantive checks passed).**" in section and "- context, not counted (pass): sequence level late" in section
    assert "<br>context, not counted (pass): sequence level late" in text[text.index("## Claims"):]
    fig1 = [ch["what"] for ch in by_figure["Fig 1/9"]["checks"]]
    assert any("second-to-last letter, before ln_f" in w for w in fig1) and any("> chance" in w for w in fig1)
    # Appendix B is checked on the synthetic model and on the GPT-2-design probe model (2 samples x 3 layers).
    assert any("of 6 (sample, layer) pairs" in ch["what"] for ch in by_figure["Appendix B"]["checks"])
    assert "current token: the last token of each validation sequence (<eos>)" in text
    assert "| ‖W_linear x‖ / ‖x‖ |" in text and "| real block: ‖z_out‖ / ‖z_in‖ |" in text
    # Figures 4/7 and Table 1 count two checks per probe stage; the rest is context, printed beside them.
    for figure in ("Fig 4/7", "Table 1 / Fig 5/8"):
        checks = by_figure[figure]["checks"]
        assert sum(ch["substantive"] for ch in checks) == 2 * len(PROBES) < len(checks)
    assert "## Table 3: samples kept after dropping final-layer loss > 10 — not comparable" in text


# --- resumability --------------------------------------------------------------------------------------

def test_rerun_skips_every_stage(tiny, capsys):
    out, settings, _ = tiny
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("stages/*/run/checkpoints/*/*")}
    records = _mtimes(out)
    capsys.readouterr()
    result = reproduce(out, "quick", settings=settings, progress=False)
    printed = capsys.readouterr().out
    assert result["failed"] == []
    for s in STAGES:
        assert f"skip {s.name} (done, key " in printed
    assert checkpoints and {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    assert _mtimes(out) == records
    assert "done (earlier run)" in (out / "REPORT.md").read_text()


def test_a_rebuilt_report_judges_the_synthetic_claims_on_analysis_json(tiny, tmp_path):
    """The claims frozen into a stage's headline are not used: the report judges analysis.json when written."""
    out = _copy(tiny[0], tmp_path)
    record_path = out / "stages/analyze_table6/stage.json"
    record = json.loads(record_path.read_text())
    record["headline"]["claims"] = []                        # a stale headline must not matter
    record_path.write_text(json.dumps(record))
    path = out / "stages/analyze_table6/analysis.json"
    analysis = json.loads(path.read_text())
    for i, row in enumerate(analysis["norms"]):             # levels that fall at the end of training: Fig 6 fails
        last = i == len(analysis["norms"]) - 1
        w = row["with_last_layer"]
        w["sequence_percent"], w["pair_percent"] = (10.0 if last else 90.0), 99.0
        w["pair_percent_by_step"][-1] = 59.0 if last else 99.0
    path.write_text(json.dumps(analysis))
    assert reproduce(out, "quick", settings=tiny[1], progress=False)["failed"] == []
    claims = {c["figure"]: c for c in json.loads((out / "report.json").read_text())["claims"]}
    assert claims["Fig 6"]["verdict"] == "not reproduced"
    assert "sequence level rises from epoch 0 (90.0% -> 10.0% late)" in [ch["what"] for ch in claims["Fig 6"]["checks"]]
    path.unlink()
    reproduce(out, "quick", settings=tiny[1], progress=False)
    claims = {c["figure"]: c for c in json.loads((out / "report.json").read_text())["claims"]}
    assert claims["Fig 6"]["verdict"] == "not tested" and not claims["Fig 6"]["checks"]
    assert claims["Fig 6"]["notes"][0].startswith("could not be judged: ") and "analysis.json" in claims["Fig 6"]["notes"][0]
    assert claims["Fig 2a/11a"]["verdict"] != "not tested"   # judged on the Table 5 run's analysis.json


def test_a_changed_setting_reruns_that_stage_and_its_dependants_only(tiny, tmp_path, capsys):
    out = _copy(tiny[0], tmp_path)
    settings = json.loads(json.dumps(tiny[1]))
    settings["train_table6"]["epochs"] = 1
    before = _mtimes(out)
    capsys.readouterr()
    reproduce(out, "quick", settings=settings, progress=False)
    printed = capsys.readouterr().out
    after = _mtimes(out)
    rerun = {"train_table6", "analyze_table6"}
    assert {name for name in before if before[name] != after[name]} == {f"stages/{n}/stage.json" for n in rerun}
    for s in STAGES:
        assert (f"skip {s.name} (done" in printed) == (s.name not in rerun)
    analysis = json.loads((out / "stages/analyze_table6/analysis.json").read_text())
    assert analysis["epochs"] == [0, 1]
    assert not (out / "stages/train_table6/run/checkpoints/epoch_0002").exists()  # the stale run was cleared


def test_a_failing_stage_is_named_its_dependants_skipped_the_rest_done(tiny, tmp_path, capsys):
    out = _copy(tiny[0], tmp_path)
    settings = json.loads(json.dumps(tiny[1]))
    settings["train_table6"]["epochs"] = 0
    settings["probe_news"]["model"] = str(tmp_path / "no-such-model")
    capsys.readouterr()
    rc = main(["reproduce", "--quick", "--out", str(out), "--no-progress", "--settings", json.dumps(settings)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "stage train_table6 failed: ValueError: epochs must be positive" in printed
    assert "stage probe_news failed: FileNotFoundError" in printed
    assert "stage analyze_table6 skipped: needs train_table6" in printed
    for name in ("data", "train_table5", "analyze_table5", "knn_table5", "probe_wikipedia", "appendix_b"):
        assert f"skip {name} (done" in printed
    record = json.loads((out / "stages/probe_news/stage.json").read_text())
    assert record["status"] == "failed" and "no-such-model" in record["error"]
    assert record["traceback"].rstrip().endswith(record["error"])  # the tail of the traceback
    text = (out / "REPORT.md").read_text()
    assert "| train_table6 |" in text and "**failed**: ValueError: epochs must be positive" in text
    assert "**skipped**: needs train_table6" in text
    claims = {c["figure"]: c for c in json.loads((out / "report.json").read_text())["claims"]}
    assert claims["Fig 6"]["verdict"] == "not tested"


# --- settings, stage selection and bad input ----------------------------------------------------------

def test_both_scales_share_one_settings_table_and_the_paper_scale_uses_the_papers_epochs():
    assert all(len(values) == len(SCALES) for table in SETTINGS.values() for values in table.values())
    paper, quick = stage_settings("paper"), stage_settings("quick")
    numbers = paper_numbers()
    assert paper["train_table5"]["epochs"] == numbers["table5_training_section5"]["epochs"]
    assert paper["train_table6"]["epochs"] == numbers["table6_training_section8_1"]["epochs"]
    assert quick["train_table5"]["epochs"] < paper["train_table5"]["epochs"]
    order = [s.name for s in STAGES]
    assert all(order.index(dep) < order.index(s.name) for s in STAGES for dep in s.needs)


def test_only_adds_the_stages_a_stage_needs():
    assert selected_stages(["analyze_table6"]) == ["data", "train_table6", "analyze_table6"]
    assert selected_stages("probe_news") == ["probe_news"]
    assert selected_stages(None) == [s.name for s in STAGES]


@pytest.mark.parametrize("argv, message", [
    (["--only", "nosuch"], "unknown stage(s) ['nosuch']"),
    (["--settings", '{"nosuch": {}}'], "settings: unknown stage 'nosuch'"),
    (["--settings", '{"knn_table5": {"kk": 3}}'], "stage knn_table5 has no setting kk"),
    (["--settings", '{"knn_table5": 3}'], "settings['knn_table5'] must be a dict"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["reproduce", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaclm reproduce: error:") and message in err
    assert not out.exists()  # nothing ran


def test_a_second_run_into_a_busy_folder_fails_at_once(tmp_path, capsys):
    """Two runs into one --out would delete each other's stage folders: the second exits 2 before any stage,
    naming the lock (exit 2: the input, the folder, is the problem, not the machine)."""
    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # what the first run holds for its whole duration
    try:
        assert main(["reproduce", "--out", str(out), "--only", "data", "--no-progress"]) == 2
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert err.startswith("metaclm reproduce: error: another `metaclm reproduce` is running into") and "--out" in err
    assert not (out / "stages").exists()


def test_quick_and_paper_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--quick", "--paper"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# --- scripts/ ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(GROUPS))
def test_script_help(script, capsys):
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPTS / script))["main"](["--help"])
    assert exc.value.code == 0 and "--paper" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(GROUPS))
def test_script_runs_its_stages(script, tiny, tmp_path, capsys):
    """Each script runs exactly its group's stages (here all already done, so each is a skip)."""
    out = _copy(tiny[0], tmp_path)
    capsys.readouterr()
    rc = runpy.run_path(str(SCRIPTS / script))["main"](["--quick", "--out", str(out), "--no-progress",
                                                        "--settings", json.dumps(tiny[1])])
    printed = capsys.readouterr().out
    assert rc == 0
    assert set(re.findall(r"^skip (\w+) \(done", printed, re.M)) == GROUPS[script]
    assert f"{len(GROUPS[script])} of {len(STAGES)} stages" in printed


def test_a_section_that_cannot_be_written_does_not_cost_the_report(tiny, tmp_path):
    """A stage record of another layout (here: probe numbers missing) breaks its sections only."""
    out = _copy(tiny[0], tmp_path)
    path = out / "stages/probe_wikipedia/stage.json"
    record = json.loads(path.read_text())
    del record["headline"]["norms"]
    path.write_text(json.dumps(record))
    assert reproduce(out, "quick", settings=tiny[1], progress=False)["failed"] == []
    text = (out / "REPORT.md").read_text()
    assert "## Table 1\n\n*This section could not be written: KeyError: 'norms'.*" in text
    assert "## Figure 6: non-decreasing norms along training" in text and "## Claims" in text
    claims = {c["figure"]: c for c in json.loads((out / "report.json").read_text())["claims"]}
    assert claims["Table 1 / Fig 5/8"]["verdict"] == "not tested"
    assert "could not be judged: the stage records lack 'norms'" in claims["Table 1 / Fig 5/8"]["notes"]


def test_commit_of_an_installed_package_names_the_working_directorys_checkout(tmp_path, monkeypatch):
    """`make demo` runs the installed package: the report names the checkout it was built from (the cwd)."""
    import subprocess

    from metaclm_ext.reproduce import provenance

    repo = tmp_path / "repo"
    (repo / "metaclm_ext").mkdir(parents=True)
    (repo / "metaclm_ext" / "__init__.py").write_text("")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    sha = git("rev-parse", "HEAD")
    # the module as if installed into a folder that is no checkout
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "site" / "metaclm_ext" / "reproduce" / "provenance.py"))
    monkeypatch.chdir(repo)
    assert provenance.commit().startswith(f"{sha} (installed metaclm_ext")
    (repo / "metaclm_ext" / "__init__.py").write_text("changed = True\n")
    assert provenance.commit().startswith(f"{sha} + uncommitted changes (installed")
    monkeypatch.chdir(tmp_path)  # not a checkout of this project
    assert provenance.commit().endswith("(not a git checkout)")
