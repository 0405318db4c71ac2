"""`metaclm attribute` and scripts/bench_real_store.py on a tiny recorded fine-tuning run (tests/finetune_fixture.py)."""
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from finetune_fixture import CHECKPOINT_STEPS, CONTEXT, HELD_OUT, TITLES, checkpoint_name, make_run
from metaclm_ext.attribution import AttributionRun
from metaclm_ext.attribution.queries import load_checkpoint, recorded_module, text_queries
from metaclm_ext.cli import main
from metaclm_ext.reference import history_topk_reference

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
K = 4
TEXT = HELD_OUT[1]  # a sentence of article 1 that was not trained on


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("finetune") / "run")


@pytest.fixture(scope="module")
def attributed(run, tmp_path_factory):
    """(result JSON, output folder) of `metaclm attribute RUN TEXT --k 4` over every position."""
    out = tmp_path_factory.mktemp("attribution")
    assert main(["attribute", str(run), TEXT, "--k", str(K), "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "attribution.json").read_text()), out


def store_tensors(run, fields):
    store = AttributionRun(run).store
    return {f: store.read_tensor(f).double() for f in fields}


def captured_queries(run, step=None):
    """(module list, {input field: [T, D] fp32}) of TEXT at the checkpoint, captured independently."""
    r = AttributionRun(run)
    modules = r.select(None)
    model, tok = load_checkpoint(r.checkpoint(step).path)
    return modules, text_queries(model, tok, TEXT, modules).inputs


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.data_script, self._in_data = [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._in_data = tag == "script" and attrs.get("type") == "application/json"

    def handle_data(self, data):
        if self._in_data:
            self.data_script = (self.data_script or "") + data

    def handle_endtag(self, tag):
        self._in_data = False


def test_result_covers_every_position_layer_and_module(run, attributed):
    result, out = attributed
    tokens = result["tokens"]
    assert result["positions"] == list(range(len(tokens))) and len(tokens) > 5
    assert result["checkpoint"]["step"] == CHECKPOINT_STEPS[-1] and result["checkpoint"]["rows"] == result["history"]["rows"]
    keys = {f"{role}.{layer}" for role in ("attn", "mlp") for layer in (0, 1)}
    assert {m["key"] for m in result["modules"]} == keys
    for p in result["positions"]:
        assert set(result["results"][str(p)]) == keys
        for entries in result["results"][str(p)].values():
            (entry,) = entries  # whole width: one head per module
            assert len(entry["top"]) == len(entry["last"]) == K
            scores = [w for _, w in entry["top"]]
            assert scores == sorted(scores, reverse=True)
            assert all(str(row) in result["rows"] for row, _ in entry["top"] + entry["last"])
    # Every row's text is rebuilt from the store: its token and target are the recorded ones.
    store = AttributionRun(run).store
    tok = load_checkpoint(AttributionRun(run).checkpoint().path)[1]
    for key, row in result["rows"].items():
        i = int(key)
        assert row["token"] == tok.decode([int(store.read("token", i, i + 1)[0])])
        assert row["next"] == tok.decode([int(store.read("target", i, i + 1)[0])])
        assert row["right"].startswith(row["next"]) and row["title"] == TITLES[row["article"]]
    summary = (out / "attribution.md").read_text()
    assert all(f"## Position {p}:" in summary for p in result["positions"])


def test_html_page_is_self_contained_and_embeds_the_result(attributed):
    result, out = attributed
    parser = _Tags()
    parser.feed((out / "attribution.html").read_text())
    linked = [(tag, attrs) for tag, attrs in parser.tags if "src" in attrs or "href" in attrs]
    assert linked == [], f"the page loads something: {linked}"
    assert {tag for tag, _ in parser.tags} >= {"html", "style", "script", "body"}
    assert json.loads(parser.data_script) == result


def test_top_and_last_rows_agree_with_the_reference(run, attributed):
    result, _ = attributed
    modules, inputs = captured_queries(run)
    history = store_tensors(run, [m.input_field for m in modules])
    for m in modules:
        want = history_topk_reference(inputs[m.input_field], history[m.input_field].float(), K)
        for p in result["positions"]:
            (entry,) = result["results"][str(p)][m.key]
            for got, sel in ((entry["top"], want.top), (entry["last"], want.last)):
                assert [r for r, _ in got] == sel.indices[p, 0].tolist()
                assert [w for _, w in got] == pytest.approx(sel.values[p, 0].tolist(), rel=1e-5, abs=1e-6)


def brute_force_shares(run, inputs, modules, result, limit):
    """{(position, key, head): (ratio, cosine) of the top rows} from all rows' terms e_t <x_t, x>."""
    fields = [f for m in modules for f in (m.input_field, m.error_field)]
    history = store_tensors(run, fields)
    out = {}
    for m in modules:
        x_t, e_t = history[m.input_field][:limit], history[m.error_field][:limit]
        for p in result["positions"]:
            entries = result["results"][str(p)][m.key]
            width = x_t.shape[1] // len(entries)
            for h, entry in enumerate(entries):
                block = slice(h * width, (h + 1) * width)
                w = x_t[:, block] @ inputs[m.input_field][p, block].double()
                total = (e_t * w[:, None]).sum(0)
                rows = [r for r, _ in entry["top"]]
                part = (e_t[rows] * w[rows, None]).sum(0)
                out[p, m.key, h] = (float(part.norm() / total.norm()),
                                    float(part @ total / (part.norm() * total.norm())), entry["top_share"])
    return out


def test_contribution_shares_equal_a_brute_force_sum(run, attributed):
    result, _ = attributed
    modules, inputs = captured_queries(run)
    shares = brute_force_shares(run, inputs, modules, result, result["checkpoint"]["rows"])
    for ratio, cosine, got in shares.values():
        assert got["ratio"] == pytest.approx(ratio, rel=1e-4)
        assert got["cosine"] == pytest.approx(cosine, rel=1e-4, abs=1e-6)
        assert got["ratio"] >= 0 and -1 - 1e-9 <= got["cosine"] <= 1 + 1e-9
    # The top rows carry a real part of the contribution somewhere (the test can see a wrong selection).
    assert max(r for r, _, _ in shares.values()) > 0.2


def test_earlier_checkpoint_per_head_sees_only_its_rows(run, tmp_path):
    first = CHECKPOINT_STEPS[1]
    assert main(["attribute", str(run), TEXT, "--checkpoint", str(first), "--per-head", "--position", "3",
                 "--layers", "1", "--k", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "attribution.json").read_text())
    limit = result["checkpoint"]["rows"]
    assert result["checkpoint"]["step"] == first and 0 < limit < result["history"]["rows"]
    assert result["positions"] == [3] and {m["key"] for m in result["modules"]} == {"attn.1", "mlp.1"}
    modules, inputs = captured_queries(run, first)
    modules = [m for m in modules if m.layer == 1]
    history = store_tensors(run, [m.input_field for m in modules])
    for m in modules:
        entries = result["results"]["3"][m.key]
        assert len(entries) == {"attn": 4, "mlp": 1}[m.role]
        want = history_topk_reference(inputs[m.input_field][3:4], history[m.input_field].float(), 2, limit=limit,
                                      heads=len(entries))
        for h, entry in enumerate(entries):
            assert [r for r, _ in entry["top"]] == want.top.indices[0, h].tolist()
            assert all(r < limit for r, _ in entry["top"] + entry["last"])
    for ratio, _, got in brute_force_shares(run, inputs, modules, result, limit).values():
        assert got["ratio"] == pytest.approx(ratio, rel=1e-4)


def test_modules_recorded_on_a_submodule_are_found(run):
    """`metaclm finetune` attaches the recorder to a view of the decoder layers: its module names are suffixes
    of the checkpoint's."""
    model, _ = load_checkpoint(AttributionRun(run).checkpoint().path)
    down = model.model.layers[1].mlp.down_proj
    assert recorded_module(model, "model.layers.1.mlp.down_proj") is down
    assert recorded_module(model, "layers.1.mlp.down_proj") is down
    with pytest.raises(ValueError, match="no module named like"):
        recorded_module(model, "layers.9.mlp.down_proj")
    with pytest.raises(ValueError, match="several modules"):
        recorded_module(model, "mlp.down_proj")


@pytest.mark.parametrize("args, reason", [
    (["x" * 10 + " hello" * CONTEXT], "context is 64 positions"),
    ([TEXT, "--checkpoint", "2"], "checkpoint 2 does not exist"),
    ([TEXT, "--checkpoint", "0"], "checkpoint 0 is the pretrained start"),
    ([TEXT, "--position", "999"], "position 999 is outside the text"),
    ([TEXT, "--k", "100000"], "k must be an int in"),
    ([TEXT, "--layers", "7"], "layers [7] are not recorded"),
    (["   "], "text is empty"),
])
def test_bad_input_exits_2_with_the_reason(run, tmp_path, capsys, args, reason):
    assert main(["attribute", str(run), *args, "--out", str(tmp_path), "--no-progress"]) == 2
    assert reason in capsys.readouterr().err


def test_run_without_history_or_checkpoint_folder(run, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    shutil.rmtree(broken / "checkpoints" / checkpoint_name(CHECKPOINT_STEPS[-1]))
    assert main(["attribute", str(broken), TEXT, "--no-progress"]) == 2
    assert "checkpoint folder" in capsys.readouterr().err
    shutil.rmtree(broken / "history")
    assert main(["attribute", str(broken), TEXT, "--no-progress"]) == 2
    assert "has no history store" in capsys.readouterr().err
    assert main(["attribute", str(tmp_path / "nothing"), TEXT, "--no-progress"]) == 2
    assert "is not a fine-tuning run" in capsys.readouterr().err


def test_bench_real_store_smoke(run, tmp_path):
    out = tmp_path / "real-store.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_real_store.py"), str(run), "--queries", "6", "--repeat", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = [c["history_rows"] for c in json.loads((run / "finetune.json").read_text())["checkpoints"][1:]]
    assert result["checkpoint_rows"] == rows and result["queries"] == 6
    by_field = {r["field"]: r for r in result["fields"]}
    assert set(by_field) == {"attn_in.0", "attn_in.1", "mlp_in.0", "mlp_in.1"}
    assert by_field["attn_in.0"]["heads"] == 4 and by_field["mlp_in.0"]["heads"] == 1
    for r in result["fields"]:
        assert r["rows_read"] == rows[-1] and r["bytes"] == rows[-1] * r["width"] * 2
        assert 0 < r["best_seconds"] <= r["seconds"] and r["limit_s"] > 0
        assert r["ratio_to_limit"] == pytest.approx(r["seconds"] / r["limit_s"])
    assert result["repeat"] == 2 and "x the limit" in proc.stdout
