"""Copy what a `metaclm reproduce` folder shows into a small folder that can be committed.

    python scripts/export_results.py OUT DEST [--max-file-mb 5]

Keeps REPORT.md, report.json and, for every stage that is done, stage.json and the files its report links
(figures, summaries, result JSON), so that DEST/REPORT.md renders with its figures. Leaves out every
training run folder (checkpoints, history stores: the stages' `run/` folders), the folders of stages that
are not done (still running in another process, failed, or never run: the report shows none of their
results), and any file over --max-file-mb, and lists what it left out. The stage records keep the commit and machine each stage ran on.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

KEPT_SUFFIXES = {".md", ".json", ".png", ".svg", ".txt", ".csv"}
RUN_FOLDERS = {"run"}  # a stage's training run: checkpoints and the history store


def _done(stage_folder: Path) -> bool:
    try:
        return json.loads((stage_folder / "stage.json").read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def export(out: Path, dest: Path, max_bytes: int) -> tuple[list[Path], list[str]]:
    if not (out / "REPORT.md").is_file():
        raise ValueError(f"{out} has no REPORT.md: not a `metaclm reproduce` output folder")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} exists and is not empty: choose a new folder")
    kept, left = [], []
    unfinished = {folder.name for folder in (out / "stages").glob("*") if not _done(folder)}
    left += [f"stages/{name}/ (stage not done)" for name in sorted(unfinished)]
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or path.is_symlink():
            continue
        if any(part in RUN_FOLDERS for part in rel.parts[:-1]):
            continue
        if rel.parts[0] == "stages" and len(rel.parts) > 2 and rel.parts[1] in unfinished:
            continue
        if path.suffix not in KEPT_SUFFIXES:
            left.append(f"{rel} (not a report file)")
            continue
        if path.stat().st_size > max_bytes:
            left.append(f"{rel} ({path.stat().st_size / 2**20:.1f} MB)")
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        kept.append(rel)
    return kept, left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the output folder of `metaclm reproduce`")
    parser.add_argument("dest", type=Path, help="a new folder for the copy")
    parser.add_argument("--max-file-mb", type=float, default=5.0)
    args = parser.parse_args()
    try:
        kept, left = export(args.out, args.dest, int(args.max_file_mb * 2**20))
    except ValueError as exc:
        print(f"export_results: {exc}", file=sys.stderr)
        return 2
    size = sum((args.dest / rel).stat().st_size for rel in kept)
    print(f"copied {len(kept)} files ({size / 2**20:.1f} MB) to {args.dest}")
    for line in left:
        print(f"  left out: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
