"""The paper-figure scripts in scripts/ run on a tiny run (so they cannot rot)."""
import json
import runpy
from pathlib import Path

import pytest

from metaclm_ext.cli import main

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0
    return run


def test_appendix_b_on_the_synthetic_model(tiny_run, capsys):
    script = runpy.run_path(str(SCRIPTS / "appendix_b_synthetic.py"))
    assert script["main"]([str(tiny_run), "--max-samples", "5"]) == 0
    out = json.loads((tiny_run / "appendix_b.json").read_text())
    pairs = [layer for s in out["per_sample"] for layer in s["layers"]]
    assert out["pairs"] == len(pairs) == 5 * 6
    assert out["satisfied_percent"] == pytest.approx(100 * sum(p["satisfied"] for p in pairs) / len(pairs))
    # Proposition 1's condition implies ||W x|| >= ||x||.
    assert all(p["norm_ratio"] >= 1 - 1e-9 for p in pairs if p["satisfied"])
    assert "satisfy Proposition 1" in capsys.readouterr().out


def test_bench_table_store_workload(tmp_path):
    """scripts/bench_table.py --store-only: writes a store, streams history_topk over it, saves JSON."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_table.py"), "--store-rows", "5000", "--store-only",
                           "--store-dir", str(tmp_path / "store"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "cpu-store.json").read_text())
    (row,) = result["results"]
    assert row["op"] == "history_topk" and row["kind"] == "attn-store" and row["rows"] == 5000 and row["ours_s"] > 0 and row["limit_s"] > 0
    assert "attn-store N=5,000" in proc.stdout


def test_bench_distributed_on_two_ranks(tmp_path):
    """scripts/bench_distributed.py: 2 gloo ranks stream a small store and time the merge."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_distributed.py"), "--rows", "3000", "--ranks", "2",
                           "--repeats", "1", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())["2"]
    assert result["rows"] == 3000 and sorted(result["ops"]) == ["dual_form_apply", "history_label_mass", "history_topk"]
    assert all(t > 0 for op in result["ops"].values() for t in op["wall"] + op["cpu"])
    assert result["merge"]["history_topk"]["state_bytes_per_rank"] == 2 * 64 * 8 * 10 * 12
    assert "2 rank(s) history_label_mass" in proc.stdout


def test_export_results_keeps_the_report_and_leaves_out_runs(tmp_path, capsys):
    """scripts/export_results.py: REPORT.md, report.json, stage records and figures; no run folders, no big files."""
    out = tmp_path / "out"
    (out / "stages" / "train_table5" / "run" / "history").mkdir(parents=True)
    (out / "stages" / "train_table5" / "run" / "history" / "shard.bin").write_bytes(b"\0" * 64)
    (out / "stages" / "train_table5" / "run" / "losses.json").write_text("{}")
    (out / "stages" / "probe_news").mkdir(parents=True)
    (out / "stages" / "train_table6").mkdir(parents=True)
    done, running = json.dumps({"status": "done"}), json.dumps({"status": "running"})
    for name, text in [("REPORT.md", "# report"), ("report.json", "{}"), ("stages/train_table5/stage.json", done),
                       ("stages/probe_news/stage.json", done), ("stages/probe_news/inner_loss.png", "png"),
                       ("stages/train_table6/stage.json", running), ("stages/train_table6/losses.png", "png")]:
        (out / name).write_text(text)
    (out / "stages" / "probe_news" / "big.json").write_text("x" * 3 * 2**20)
    script = runpy.run_path(str(SCRIPTS / "export_results.py"))
    kept, left = script["export"](out, tmp_path / "dest", 2**20)
    assert sorted(map(str, kept)) == ["REPORT.md", "report.json", "stages/probe_news/inner_loss.png",
                                      "stages/probe_news/stage.json", "stages/train_table5/stage.json"]
    assert left == ["stages/train_table6/ (stage not done)", "stages/probe_news/big.json (3.0 MB)"]
    assert (tmp_path / "dest" / "stages" / "probe_news" / "inner_loss.png").read_text() == "png"
    with pytest.raises(ValueError, match="not empty"):
        script["export"](out, tmp_path / "dest", 2**20)
    with pytest.raises(ValueError, match="no REPORT.md"):
        script["export"](tmp_path / "dest" / "stages", tmp_path / "other", 2**20)


def test_profile_attention_on_a_tiny_run(tmp_path):
    """scripts/profile_attention.py: times the attention stage's parts of a run with a history."""
    run = tmp_path / "tiny"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--record-history", "--no-progress"]) == 0
    script = runpy.run_path(str(SCRIPTS / "profile_attention.py"))
    out = tmp_path / "profile.json"
    assert script["main"]([str(run), "--fields", "attn_in.0,mlp_in.0", "--repeat", "1", "--per-checkpoint",
                           "--json", str(out)]) == 0
    profile = json.loads(out.read_text())
    assert sorted(profile["fields"]) == ["attn_in.0", "mlp_in.0"]
    attn = profile["fields"]["attn_in.0"]
    assert attn["heads"] == 8 and profile["fields"]["mlp_in.0"]["heads"] == 1
    assert attn["queries"] == 3 * 16 and len(attn["per_checkpoint"]["wall_s"]) == 3
    assert all(attn[part]["wall_s"] > 0 for part in ("read", "read_unverified", "memory", "streamed", "python"))


def test_topk_cpu_time_reports_both_workloads(monkeypatch):
    """scripts/topk_cpu_time.py: the per-checkpoint workload and the one-limit one, each timed."""
    monkeypatch.syspath_prepend(str(SCRIPTS))  # as `python scripts/topk_cpu_time.py` has it: bench_table beside it
    script = runpy.run_path(str(SCRIPTS / "topk_cpu_time.py"))
    results = script["main"](["--rows", "3000", "--checkpoints", "3", "--repeats", "1", "--threads", "2"])
    assert [(r["queries"], r["limits"]) for r in results] == [(600, 3), (200, 1)]
    assert all(r["cpu_s"] >= 0 and r["wall_s"] > 0 for r in results)
    with pytest.raises(SystemExit):
        script["main"](["--rows", "0"])
