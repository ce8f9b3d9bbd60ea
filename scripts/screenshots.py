"""Regenerate the README's screenshots of the explore view and of the live page (docs/img/explore*.png).

    python scripts/screenshots.py

The same harness as tests/test_explore.py: the built-in tiny model, Debian's Chromium driven by
playwright (pip install playwright; apt-get install chromium), a view saved to a temporary file,
and the live server on a free port of 127.0.0.1.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from pathlib import Path

import phi3_scratch as p3
from phi3_scratch.serve import Explorer, make_server

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What does the KV cache do?"


def main() -> int:
    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        print("no Chromium: apt-get install -y --no-install-recommends chromium", file=sys.stderr)
        return 1
    model, tokenizer = p3.Phi3ForCausalLM.from_pretrained("tiny"), p3.Tokenizer.from_pretrained("tiny")
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        view = p3.explore(model, tokenizer, PROMPT, chat=True, name="tiny").save(Path(folder) / "view.html")
        page.goto(view.as_uri())
        page.select_option("#layer", "2")
        page.select_option("#head", "1")
        page.screenshot(path=ROOT / "docs" / "img" / "explore.png", full_page=True)
        server = make_server(Explorer(model, tokenizer, "tiny", PROMPT, chat=True), port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.select_option("#ablate-kind", "head")
        page.select_option("#ablate-layer", "1")
        page.select_option("#ablate-head", "2")
        page.click("#run")
        expect(page.locator("#status")).to_contain_text("ablated", timeout=60_000)
        page.screenshot(path=ROOT / "docs" / "img" / "explore-live.png", clip={"x": 0, "y": 0, "width": 1100,
                                                                                "height": 560})
        server.shutdown()
        browser.close()
    print("wrote docs/img/explore.png and docs/img/explore-live.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
