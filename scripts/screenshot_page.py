#!/usr/bin/env python
"""A headless-browser screenshot of an attribution page with one token selected (to check that it renders).

    python scripts/screenshot_page.py RUN/attribution/attribution.html docs/images/attribute-page.png --position 5 --layer 20

Runs Debian's chromium (`apt-get install chromium`) on ``page.html#pos=N&layer=L`` (the page selects token
N itself, as a click would, and shows the layers from L on) and stores the PNG with a 256-colour palette, which keeps a text-only page
small enough to commit.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, out: Path, fragment: str, width: int, height: int) -> None:
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise SystemExit(f"no headless browser found (tried {', '.join(BROWSERS)}): apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "page.png"
        # --no-sandbox: root in a container has no user namespace for the sandbox.
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", f"--screenshot={raw}",
                        f"{page.resolve().as_uri()}#{fragment}"], check=True, capture_output=True, timeout=120)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(raw).convert("RGB").quantize(256).save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path, help="attribution.html of `metaclm attribute`")
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--position", type=int, default=0, help="the token to select (default 0)")
    ap.add_argument("--layer", type=int, default=None, help="show the layers from this one on (default: all)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    args = ap.parse_args(argv)
    if not args.page.is_file():
        ap.error(f"page {args.page} does not exist")
    fragment = f"pos={args.position}" + ("" if args.layer is None else f"&layer={args.layer}")
    screenshot(args.page, args.out, fragment, args.width, args.height)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
