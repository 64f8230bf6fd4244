"""The headless-Chromium page checker the report tests rely on."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from browser import ChromiumNotFoundError, check_page
from PIL import Image

RED = (255, 0, 0)


def _png_data_uri(size: tuple[int, int] = (60, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, RED).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _write(path: Path, body: str, title: str = "Report") -> Path:
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body>{body}</body></html>",
        encoding="utf-8",
    )
    return path


def test_good_page_has_no_errors_and_renders(tmp_path: Path) -> None:
    html = _write(
        tmp_path / "index.html",
        "<h1>Table 8a</h1><h2>Temporal   modules</h2>"
        "<table><tr><th>variant</th><th>K400</th></tr><tr><td>all</td><td>1.0</td></tr></table>"
        f"<h3>Curve</h3><img alt='curve' src='{_png_data_uri()}'>",
    )
    shot = tmp_path / "shots" / "index.png"

    check = check_page(html, shot)

    assert check.title == "Report"
    assert check.headings == ["Table 8a", "Temporal modules", "Curve"]
    assert check.table_count == 1
    assert check.table_headers == [["variant", "K400"]]
    assert check.images == 1
    assert check.broken_images == []
    assert check.console_errors == []
    with Image.open(shot) as img:
        assert img.format == "PNG"
        assert img.width == 1280
        pixels = img.convert("RGB")
        colors = pixels.getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 2  # text, background and the image
    assert sum(count for count, rgb in colors if rgb == RED) >= 60 * 40  # the image was drawn


def test_broken_image_and_script_errors_are_reported(tmp_path: Path) -> None:
    html = _write(
        tmp_path / "index.html",
        "<h1>Broken</h1><img src='missing.png'>"
        "<script>console.error('boom')</script>"
        "<script>throw new Error('uncaught bad thing')</script>",
    )

    check = check_page(html, tmp_path / "broken.png")

    assert check.images == 1
    assert check.broken_images == ["missing.png"]
    joined = "\n".join(check.console_errors)
    assert "console: boom" in joined
    assert "uncaught bad thing" in joined
    assert any(e.startswith("request failed:") and "missing.png" in e for e in check.console_errors)
    assert (tmp_path / "broken.png").stat().st_size > 0


def test_missing_chromium_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    html = _write(tmp_path / "index.html", "<h1>x</h1>")

    with pytest.raises(ChromiumNotFoundError, match="apt-get install"):
        check_page(html, tmp_path / "x.png")
