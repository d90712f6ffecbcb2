"""The docs site: it builds with `mkdocs build --strict` (a missing page or a broken link fails it), its
configuration reference is generated from conf/ as it is built (what `python -m imgret.cli` prints), and its pages
render in Chromium."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from documented import PROJECT_ROOT, documented, run_command



def test_the_configuration_reference_is_generated_from_conf_as_it_is():
    fresh = run_command(documented("python -m imgret.cli"), PROJECT_ROOT).stdout
    for option in (PROJECT_ROOT / "conf").glob("*/*.yaml"):  # every option of every group, with its keys
        assert f"### {'+' if option.parent.name == 'experiment' else ''}{option.parent.name}={option.stem}\n" in fresh
        assert option.read_text().rstrip("\n") in fresh, option
    assert "extract:\n  devices: 1" in fresh  # config.yaml's keys, comments and all


def build_site(out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def test_the_site_builds_strictly_with_every_page_in_its_navigation(tmp_path):
    built = build_site(tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    pages = {page.relative_to(PROJECT_ROOT / "docs").with_suffix("").as_posix()
             for page in (PROJECT_ROOT / "docs").rglob("*.md")}
    for page in pages:  # each page built, and every page named in the navigation (else mkdocs only says INFO)
        assert (tmp_path / "site" / ("" if page == "index" else page) / "index.html").is_file(), page
    assert "not included in the \"nav\"" not in built.stderr, built.stderr[-2000:]
    # the page generated as the site is built (tools/mkdocs_hooks.py), every method's yaml in it
    reference = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    assert all(f">method={option.stem}<" in reference for option in (PROJECT_ROOT / "conf" / "method").glob("*.yaml"))


def test_a_broken_link_fails_the_build(tmp_path):
    """The check can fail: the same site with one link to a page that does not exist."""
    copy = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "docs", copy / "docs")
    shutil.copy(PROJECT_ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(PROJECT_ROOT / "tools", copy / "tools")
    (copy / "docs" / "design.md").write_text((copy / "docs" / "design.md").read_text() + "\n[gone](how-to/gone.md)\n")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "s")],
                           cwd=copy, capture_output=True, text=True, timeout=300)
    assert built.returncode != 0 and "gone.md" in built.stderr


@pytest.mark.slow  # a browser
def test_the_front_page_and_a_results_page_render_in_chromium(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    assert build_site(tmp_path / "site").returncode == 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((tmp_path / "site" / "index.html").as_uri())
            assert "imgret" in page.title() and page.locator("nav").count() > 0
            page.screenshot(path=str(tmp_path / "front.png"))
            page.goto((tmp_path / "site" / "results" / "ann-libraries" / "index.html").as_uri())
            figure = page.locator("img[alt^='ANN libraries on trained']").first
            figure.scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
            assert page.locator("table").count() >= 2
            page.screenshot(path=str(tmp_path / "results.png"))
        finally:
            browser.close()


def test_the_metrics_reference_is_generated_from_the_registry():
    """Each metric is declared once (imgret/measure/registry.py); the page's table is what it generates now."""
    from imgret.measure.registry import METRICS, reference_table

    page = (PROJECT_ROOT / "docs" / "reference" / "metrics.md").read_text()
    command = documented("python -m imgret.measure.registry")
    assert run_command(command, PROJECT_ROOT).stdout == reference_table()
    assert reference_table() in page, f"docs/reference/metrics.md's table is stale: paste `{command}`'s output"
    assert all(f"`{metric.name}`" in page for metric in METRICS)
    assert len({metric.name for metric in METRICS}) == len(METRICS), "each metric declared once"
