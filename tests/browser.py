"""Open an HTML file in headless Chromium and report what a reader would see.

Drives the system ``chromium`` (Debian package) with Playwright; no browser download is needed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Request, sync_playwright

SRC_CHARS = 80

# Runs in the page after "load": every <img> has either loaded or failed by then.
_INSPECT_JS = """() => {
  const text = (el) => el.textContent.replace(/\\s+/g, " ").trim();
  const headings = Array.from(document.querySelectorAll("h1, h2, h3"), text);
  const tables = Array.from(document.querySelectorAll("table"));
  const images = Array.from(document.images);
  return {
    headings,
    table_headers: tables.map((t) => Array.from(t.querySelectorAll("th"), text)),
    images: images.length,
    broken: images
      .filter((img) => !img.complete || img.naturalWidth === 0)
      .map((img) => img.getAttribute("src") || img.currentSrc || ""),
  };
}"""


class ChromiumNotFoundError(RuntimeError):
    """The ``chromium`` binary is not on PATH."""


@dataclass
class PageCheck:
    """What headless Chromium saw when it opened one page.

    Attributes:
        title: The document title.
        headings: Text of the h1, h2 and h3 elements, in document order.
        table_count: Number of ``<table>`` elements.
        table_headers: Text of each table's ``<th>`` cells, one list per table.
        images: Number of ``<img>`` elements.
        broken_images: ``src`` (first 80 characters) of every image that did not load.
        console_errors: Console messages of type error, uncaught page errors and failed
            requests, each prefixed with its kind.
    """

    title: str
    headings: list[str]
    table_count: int
    images: int
    broken_images: list[str]
    console_errors: list[str]
    table_headers: list[list[str]] = field(default_factory=list)


def _shorten(url: str) -> str:
    """Keep the start and the end (the file name) of a long URL, e.g. a data: URI."""
    if len(url) <= SRC_CHARS:
        return url
    half = SRC_CHARS // 2
    return f"{url[:half]}...{url[-half:]}"


def find_chromium() -> str:
    """Return the path of the system ``chromium``.

    Raises:
        ChromiumNotFoundError: If it is not installed.
    """
    path = shutil.which("chromium")
    if path is None:
        raise ChromiumNotFoundError(
            "chromium not found on PATH: install the Debian package with "
            "`apt-get install -y --no-install-recommends chromium` (scripts/test.sh does this)"
        )
    return path


def check_page(html: Path, screenshot: Path, *, width: int = 1280, height: int = 800) -> PageCheck:
    """Open ``html`` in headless Chromium, save a full-page screenshot and inspect the page.

    Args:
        html: The HTML file, opened through a ``file://`` URL (relative links resolve
            against its folder).
        screenshot: Where the full-page PNG screenshot is written (folders are created).
        width: Viewport width in CSS pixels.
        height: Viewport height in CSS pixels (the screenshot covers the whole page).

    Returns:
        The page's title, headings, tables, images and errors.

    Raises:
        ChromiumNotFoundError: If ``chromium`` is not installed.
    """
    executable = find_chromium()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"console: {message.text}")

    def on_request_failed(request: Request) -> None:
        errors.append(f"request failed: {_shorten(request.url)} ({request.failure})")

    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("requestfailed", on_request_failed)
            page.goto(html.resolve().as_uri(), wait_until="load")
            found = page.evaluate(_INSPECT_JS)
            page.screenshot(path=str(screenshot), full_page=True)
            title = page.title()
        finally:
            browser.close()
    return PageCheck(
        title=title,
        headings=found["headings"],
        table_count=len(found["table_headers"]),
        images=found["images"],
        broken_images=[src[:SRC_CHARS] for src in found["broken"]],
        console_errors=errors,
        table_headers=found["table_headers"],
    )
