"""The stage runner of `metaclm reproduce`: resumable, keyed by configuration, failures isolated.

Each stage runs in OUT/stages/<name>/ and ends by writing stage.json: its key (sha256 of the canonical JSON of
its settings, the keys of the stages it needs and the package version), settings, status, wall time, error
and headline numbers. A rerun skips a stage whose stage.json is done under the same key; a changed setting
changes the key of that stage and of every stage downstream, which are cleared and rerun. A stage that
fails is recorded with its reason; the stages that need it are skipped; the others still run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..locks import try_lock
from .provenance import commit, machine
from .stages import SCALES, SETTINGS, STAGES, Context

DONE, FAILED, SKIPPED, NOT_SELECTED = "done", "failed", "skipped", "not selected"
BY_NAME = {s.name: s for s in STAGES}
LOCK_FILE = "reproduce.lock"


def stage_settings(scale: str, overrides: Optional[dict] = None) -> dict:
    """{stage: {setting: value}} of ``scale`` with ``overrides`` ({stage: {setting: value}}) applied."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    column = SCALES.index(scale)
    cfgs = {stage: {k: copy.deepcopy(v[column]) for k, v in table.items()} for stage, table in SETTINGS.items()}
    if overrides is None:
        return cfgs
    if not isinstance(overrides, dict):
        raise TypeError(f"settings must be a dict {{stage: {{setting: value}}}}, got {type(overrides).__name__}")
    for stage, values in overrides.items():
        if stage not in cfgs:
            raise ValueError(f"settings: unknown stage {stage!r}; stages are {', '.join(cfgs)}")
        if not isinstance(values, dict):
            raise TypeError(f"settings[{stage!r}] must be a dict of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cfgs[stage]))
        if unknown:
            raise ValueError(f"settings: stage {stage} has no setting {', '.join(unknown)}; it has "
                             f"{', '.join(cfgs[stage])}")
        cfgs[stage].update(copy.deepcopy(values))
    return cfgs


def selected_stages(only) -> list[str]:
    """The stages ``only`` names and every stage they need, in run order (all stages for None)."""
    if only is None:
        return [s.name for s in STAGES]
    only = [only] if isinstance(only, str) else list(only)
    unknown = [name for name in only if name not in BY_NAME]
    if unknown or not only:
        raise ValueError(f"unknown stage(s) {unknown or '(none given)'}; stages are {', '.join(BY_NAME)}")
    wanted = set()

    def add(name):
        if name not in wanted:
            wanted.add(name)
            for dep in BY_NAME[name].needs:
                add(dep)
    for name in only:
        add(name)
    return [s.name for s in STAGES if s.name in wanted]


def stage_keys(cfgs: dict) -> dict:
    """{stage: key}; a stage's key covers its settings, the keys of the stages it needs and the version."""
    from .. import __version__

    keys = {}
    for s in STAGES:
        blob = {"stage": s.name, "settings": cfgs[s.name], "needs": {d: keys[d] for d in s.needs},
                "version": __version__}
        keys[s.name] = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()
    return keys


def read_record(out: Path, name: str) -> Optional[dict]:
    path = out / "stages" / name / "stage.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_record(out: Path, record: dict) -> None:
    folder = out / "stages" / record["name"]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "stage.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(folder / "stage.json")  # a killed run never leaves a half-written record


def _run_stage(out: Path, name: str, key: str, cfg: dict, ctx: Context, code: str) -> dict:
    folder = out / "stages" / name
    if folder.exists():
        shutil.rmtree(folder)  # stale results of another key (or of a run that died) must not mix in
    folder.mkdir(parents=True)
    record = {"name": name, "key": key, "settings": cfg, "needs": list(BY_NAME[name].needs), "status": "running",
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": code, "machine": machine()}
    _write_record(out, record)
    start = time.perf_counter()
    try:
        headline = BY_NAME[name].run(ctx, cfg, folder)
        record.update(status=DONE, headline=headline)
    except Exception as exc:  # a failing stage is recorded; the others go on
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        record.update(status=FAILED, error=reason,
                      traceback="".join(traceback.format_exc().splitlines(keepends=True)[-12:]))
    record["seconds"] = time.perf_counter() - start
    _write_record(out, record)
    return record


def reproduce(out_dir, scale: str = "quick", only=None, settings: Optional[dict] = None,
              progress: bool = True) -> dict:
    """Run the stages (``only``: those named and what they need) into ``out_dir``, then write REPORT.md.

    ``settings`` overrides single settings per stage ({stage: {setting: value}}, see SETTINGS). Returns
    {"records": {stage: record}, "failed": [stages not done among those selected], "report": path}. One run
    per folder: a second one into the same OUT fails at once (ValueError) while the first holds OUT/reproduce.lock.
    """
    cfgs = stage_settings(scale, settings)
    chosen = selected_stages(only)
    keys = stage_keys(cfgs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = try_lock(out / LOCK_FILE)
    if lock is None:
        raise ValueError(f"another `metaclm reproduce` is running into {out} ({out / LOCK_FILE} is locked): wait "
                         "for it to finish or choose another --out")
    try:
        return _run_stages(out, scale, cfgs, chosen, keys, progress)
    finally:
        os.close(lock)


def _run_stages(out: Path, scale: str, cfgs: dict, chosen: list[str], keys: dict, progress: bool) -> dict:
    """The body of reproduce(), run while it holds the lock on OUT."""
    from .report import write_report

    print(f"metaclm reproduce: scale {scale}, {len(chosen)} of {len(STAGES)} stages, into {out}")
    ctx = Context({s.name: out / "stages" / s.name for s in STAGES}, progress)
    code = commit()
    records = {}
    for name in (s.name for s in STAGES):
        key, cfg = keys[name], cfgs[name]
        old = read_record(out, name)
        current = old is not None and old.get("status") == DONE and old.get("key") == key
        if name not in chosen:
            records[name] = {**old, "reused": True} if current else {"name": name, "key": key, "settings": cfg,
                                                                     "status": NOT_SELECTED}
            continue
        if current:
            print(f"skip {name} (done, key {key[:12]})")
            records[name] = {**old, "reused": True}
            continue
        missing = [d for d in BY_NAME[name].needs if records[d]["status"] != DONE]
        if missing:
            records[name] = {"name": name, "key": key, "settings": cfg, "status": SKIPPED,
                             "error": f"needs {', '.join(missing)}"}
            print(f"stage {name} skipped: needs {', '.join(missing)}")
            continue
        step = chosen.index(name) + 1
        print(f"[{step}/{len(chosen)}] {name}: start ({BY_NAME[name].what}; key {key[:12]})", flush=True)
        record = _run_stage(out, name, key, cfg, ctx, code)
        records[name] = record
        if record["status"] == DONE:
            print(f"[{step}/{len(chosen)}] {name}: done in {record['seconds']:.1f} s", flush=True)
        else:
            print(f"stage {name} failed: {record['error']} (after {record['seconds']:.1f} s; traceback in "
                  f"{out / 'stages' / name / 'stage.json'})", flush=True)
    report = write_report(out, scale, cfgs, records, chosen)
    failed = [n for n in chosen if records[n]["status"] != DONE]
    print(f"wrote {report} ({len(chosen) - len(failed)} of {len(chosen)} stages done"
          + (f"; not done: {', '.join(failed)})" if failed else ")"))
    return {"records": records, "failed": failed, "report": str(report)}
