"""Rendering a report in Debian's chromium, headless, driven by Playwright (tests/test_report.py,
tests/test_demo.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# as the probe of this machine kind runs it: headless, and without the background connections a
# closed network refuses
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def opened(index: Path, chromium: str) -> Iterator[tuple[object, list[str]]]:
    """The page at ``index`` loaded in chromium, and every URL it has requested so far."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(accept_downloads=True, viewport={"width": 1300, "height": 1000})
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        try:
            yield page, requests
        finally:
            browser.close()


def rendered(page) -> dict[str, list]:
    """What the page shows: per flagged card its uri and its thumbnail's decoded width (0: none), per
    plot its src and decoded width."""
    cards = "cs => cs.map(c => [c.dataset.uri, c.querySelector('img')?.naturalWidth ?? 0])"
    plots = "imgs => imgs.map(i => [i.getAttribute('src'), i.naturalWidth])"
    return {"flagged": page.eval_on_selector_all("#flagged-sheet .card", cards),
            "plots": page.eval_on_selector_all(".plots img", plots)}
