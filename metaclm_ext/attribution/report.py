"""The attribution's files: attribution.json (everything), attribution.md (a summary per position) and
attribution.html (the interactive page, :mod:`.page`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..markdown import table
from .page import render_page

FILES = {"json": "attribution.json", "markdown": "attribution.md", "html": "attribution.html"}
SHOWN = 3  # top rows named per module in the Markdown summary


def row_text(row: dict) -> str:
    """``left [token] next...`` on one line, for a Markdown cell."""
    after = row["right"][len(row["next"]):]
    text = f"{row['left']}**[{row['token']}]**_{row['next']}_{after}"
    return text.replace("|", "\\|").replace("\n", " ").strip()


def fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    ck = result["checkpoint"]
    lines = [
        "# Attribution of a text to its fine-tuning history",
        "",
        f"Run `{result['run']}`, checkpoint step {ck['step']} ({ck['rows']:,} of {result['history']['rows']:,} history "
        f"rows); model: {(result.get('model') or {}).get('description', 'n/a')}.",
        "",
        f"Text ({len(result['tokens'])} tokens): {result['text']!r}",
        "",
        f"k = {result['k']}; attention {'per head' if result['per_head'] else 'whole width (all heads together)'}; "
        f"{result['seconds']:.1f} s.",
        "",
        *[f"- **{name}**: {text}" for name, text in result["definitions"].items()],
        "",
    ]
    modules = result["modules"]
    for p in result["positions"]:
        token = result["tokens"][p]["text"]
        following = result["tokens"][p + 1]["text"] if p + 1 < len(result["tokens"]) else None
        lines += [f"## Position {p}: {token!r}" + (f" (next {following!r})" if following is not None else ""), ""]
        body = []
        for m in modules:
            for h, entry in enumerate(result["results"][str(p)][m["key"]]):
                top = "; ".join(f"{row_text(result['rows'][str(i)])} ({w:.3g})" for i, w in entry["top"][:SHOWN])
                body.append([m["layer"], m["role"] + (f" h{h}" if m["heads"] > 1 else ""), top,
                             fmt(entry["top_share"]["ratio"]), fmt(entry["top_share"]["cosine"], ".2f"),
                             fmt(entry["last_share"]["ratio"]), fmt(entry["total_norm"], ".3g")])
        lines += table(["layer", "module", f"top {SHOWN} (token in **[ ]**, its target in _ _; score)",
                        "top-k ratio", "top-k cos", "last-k ratio", "‖C‖"], body)
        lines.append("")
    return "\n".join(lines)


def write_outputs(result: dict, out) -> dict[str, str]:
    """Write the three files into ``out`` (created); returns {kind: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: str(out / name) for kind, name in FILES.items()}
    Path(paths["json"]).write_text(json.dumps(result, indent=1, ensure_ascii=False, allow_nan=False))
    Path(paths["markdown"]).write_text(markdown(result))
    Path(paths["html"]).write_text(render_page(result))
    return paths
