"""A generated report in a real browser (headless Chromium over the DevTools pipe): every image loads, no console
error, and a screenshot is saved. scripts/test.sh (what CI runs) installs Debian's chromium when it is missing and
sets FSAD_REQUIRE_CHROMIUM=1, so there the test cannot be skipped."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from report import write_report
from tests.fixtures import load_script
from tests.report.helpers import make_class, page_images, results_for

browser = load_script(Path(__file__).resolve().parents[2] / "scripts" / "browser_check.py", "browser_check")

if browser.find_chromium() is None:
    if os.environ.get("FSAD_REQUIRE_CHROMIUM"):
        raise RuntimeError("FSAD_REQUIRE_CHROMIUM is set but chromium is not installed")
    pytest.skip("chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)


def test_report_renders_in_chromium(tmp_path):
    records = [make_class(tmp_path / "data", name) for name in ("widget", "gadget")]
    page = write_report(tmp_path / "run", results_for(records, tmp_path / "data"), records, max_images=2)
    shot = tmp_path / "report.png"
    result = browser.check_page(page, shot, width=1200, height=1400)
    assert result["title"] == "fsad report: knn on data"
    assert len(result["images"]) == len(page_images(page)) == 2 * (1 + 1 + 6 * 4)  # plot, support, 6 examples
    assert all(complete and width > 0 for _, complete, width in result["images"]), result["images"]
    assert result["errors"] == []
    image = Image.open(shot)
    assert image.size == (1200, 1400)
    pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 50 and pixels.max() > 200  # not a blank page: text and plots were drawn


def test_broken_image_and_console_error_are_caught(tmp_path):
    """The check itself can fail: a missing file and a script error are both reported."""
    page = tmp_path / "bad.html"
    head = '<!DOCTYPE html><html><head><title>bad</title><link rel="icon" href="data:,"></head>'
    body = '<body><img src="missing.png" alt="gone"><script>console.error("oops")</script></body></html>'
    page.write_text(head + body)
    result = browser.check_page(page)
    assert result["images"] == [("gone", True, 0)]
    assert any("oops" in e for e in result["errors"])
