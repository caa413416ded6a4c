"""``influence-bench report --html``: the static page, checked in Debian's headless Chromium.

The browser tests skip where chromium or chromedriver is missing, unless INFLUENCE_BENCH_REQUIRE_BROWSER=1
(CI sets it), where a missing browser fails. The driver path is always given, so selenium-manager never
downloads anything. Each check (console, sort, blank screenshot) is proven to fail on a broken page."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from influence_bench.cli.main import main
from influence_bench.reporting.runfiles import write_run
from influence_bench.reporting.schema import Case, load_run

EVIL = "<script>alert(1)</script>"
EVIL_MSG = '<img src=x onerror="alert(2)"> could not run & stopped'
SPEARMAN, ESTIMATOR = 4, 1  # column indexes in the fidelity table


def _cases() -> list[Case]:
    """Two toy settings, three estimators with distinct Spearman values, a skipped case and an estimator
    whose name and message are markup."""
    cases = []
    values = {("toy-a", "alpha"): 0.61, ("toy-a", "beta"): 0.12, ("toy-a", EVIL): 0.47,
              ("toy-b", "alpha"): 0.83, ("toy-b", "beta"): -0.2, ("toy-b", EVIL): 0.35}
    for (setting, est), v in values.items():
        info = {"dataset": "toy", "family": "mlp", "depth": 2 if setting == "toy-a" else 3, "width": 8,
                "weight_decay": 1e-3, **({"lossy": "jpeg-q75"} if setting == "toy-b" else {})}
        for metric, shift in (("spearman", 0.0), ("pearson", -0.05)):
            per = [v + shift - 0.1, v + shift, v + shift + 0.1]
            cases.append(Case(est, setting, 2, "hash-" + setting, "loo-fixed", "warm", metric, value=v + shift,
                              ci_low=v + shift - 0.1, ci_high=v + shift + 0.1, n_test=3, per_test=per,
                              noise_ceiling=0.9 if setting == "toy-b" else 1.0, wall_time_s=0.01 + abs(v),
                              peak_memory_mb=100 + 10 * abs(v), setting_info=info))
    cases.append(Case("gamma", "toy-a", 2, "hash-toy-a", "loo-fixed", "warm", "spearman", status="skipped",
                      message="gamma needs a GPU\nsecond line of the reason", setting_info=cases[0].setting_info))
    cases.append(Case(EVIL, "toy-c", 1, "h", "loo-fixed", "warm", "spearman", status="error", message=EVIL_MSG))
    return cases


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("html")
    run = write_run(folder / "run.json", _cases(), extra={"tier": "smoke"})
    assert main(["report", str(run), "--html", str(folder / "site")]) == 0
    return folder / "site" / "index.html"


def test_page_is_static_escaped_and_complete(page):
    html = page.read_text()
    assert EVIL not in html and "<img src=x" not in html  # a run file is untrusted: all escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt; could not run &amp; stopped" in html
    assert html.count("<script>") == 1  # the page's own, allowed by hash in its Content-Security-Policy
    for remote in ("http://", "https://", "//cdn", "@import"):
        assert remote not in html, remote  # nothing fetched from the network
    assert "gamma needs a GPU\nsecond line of the reason" in html  # the reason, whole
    assert "JPEG q75 re-encoding" in html and "hash-toy-b" in html and "warm" in html
    run = load_run(page.parents[1] / "run.json")
    assert f">{run.machine['torch']}<" in html and run.created in html and ">smoke<" in html
    for img in ("spread.png", "time_vs_fidelity.png", "fidelity_vs_depth.png"):
        assert f'data-file="{img}"' in html and (page.parent / img).is_file()  # in the page, and beside it
    assert html.count('src="data:image/png;base64,') >= 3 and "img-src data:;" in html
    from influence_bench import __version__

    assert f"influence-bench {__version__}" in html


def test_report_writes_markdown_and_html_together(tmp_path, capsys):
    run = write_run(tmp_path / "run.json", _cases()[:4])
    assert main(["report", str(run), "--out", str(tmp_path / "md"), "--html", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert "report.md" in out and "index.html" in out
    assert (tmp_path / "md" / "report.md").is_file() and (tmp_path / "site" / "index.html").is_file()


# ---------------------------------------------------------------- the browser

def _browser_paths() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver"))


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    chromium, chromedriver = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = [name for name, ok in (("chromium", chromium), ("chromedriver", chromedriver),
                                     ("selenium", webdriver)) if not ok]
    if missing:
        why = f"{', '.join(missing)} not found (Debian: apt-get install chromium chromium-driver; pip: selenium)"
        if os.environ.get("INFLUENCE_BENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"INFLUENCE_BENCH_REQUIRE_BROWSER=1 but {why}", pytrace=False)
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def open_page(drv, path: Path) -> None:
    drv.get_log("browser")  # drop the previous page's messages
    drv.get(path.resolve().as_uri())


def assert_no_console_errors(drv) -> None:
    severe = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"console errors: {severe}"


def column(drv, index: int) -> list[str | None]:
    """The visible order of the fidelity table's ``index`` column: each cell's data-v, else its text."""
    return drv.execute_script(
        "var i = arguments[0]; return Array.from(document.querySelectorAll('#fidelity tbody tr')).map("
        "function (r) { var c = r.cells[i]; var v = c.getAttribute('data-v');"
        " return v === null ? c.textContent : v; });", index)


def assert_sorts(drv, index: int, numeric: bool) -> None:
    """Clicking header ``index`` sorts the rows ascending (blanks last), clicking again descending."""
    header = drv.find_elements("css selector", "#fidelity thead th")[index]

    def split(vals):
        if not numeric:
            return [v.lower() for v in vals], []
        return [float(v) for v in vals if v != ""], [v for v in vals if v == ""]

    for descending in (False, True):
        header.click()
        vals = column(drv, index)
        filled, blanks = split(vals)
        assert len(filled) >= 3, vals
        assert filled == sorted(filled, reverse=descending), f"not sorted {'desc' if descending else 'asc'}: {vals}"
        if numeric:
            assert vals[len(filled):] == blanks, f"blanks not last: {vals}"


def assert_not_blank(png: bytes) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    white = float((img > 0.97).all(axis=-1).mean())
    assert colours >= 50 and white < 0.97, f"blank screenshot: {colours} colours, {white:.1%} white"


def test_page_in_chromium_sorts_filters_and_renders(driver, page):
    open_page(driver, page)
    assert driver.title == "influence-bench report"
    assert_no_console_errors(driver)  # CSP, script, images: nothing failed
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # the estimator named <script>alert(1)</script> ran nothing
    assert driver.execute_script(
        "return Array.from(document.images).every(function (i) { return i.complete && i.naturalWidth > 0; })")
    # the markup-named estimator is shown as text
    names = column(driver, ESTIMATOR)
    assert EVIL in names and len(names) == 8
    assert_sorts(driver, SPEARMAN, numeric=True)
    assert column(driver, SPEARMAN)[:6] == [repr(v) for v in (0.83, 0.61, 0.47, 0.35, 0.12, -0.2)]
    assert_sorts(driver, ESTIMATOR, numeric=False)
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "filter")
    box.send_keys("skipped")
    shown = driver.execute_script("return Array.from(document.querySelectorAll('#fidelity tbody tr'))"
                                  ".filter(function (r) { return !r.hidden; }).map(function (r) {"
                                  " return r.cells[1].textContent; });")
    assert shown == ["gamma"] and driver.find_element("id", "shown").text == "1"
    box.send_keys(Keys.BACKSPACE * len("skipped"))
    assert driver.find_element("id", "shown").text == "8"
    assert_not_blank(driver.get_screenshot_as_png())
    assert_no_console_errors(driver)


def test_console_check_catches_a_script_error(driver, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    open_page(driver, bad)
    with pytest.raises(AssertionError, match="console errors"):
        assert_no_console_errors(driver)


def test_sort_check_catches_a_sort_that_does_nothing(driver, page):
    """The real page with the line that moves the rows taken out (and its CSP, which would refuse the
    edited script): the script runs, the header toggles, the rows stay put."""
    html = page.read_text()
    csp = next(line for line in html.splitlines() if "Content-Security-Policy" in line)
    sort_line = "rows.forEach(function (r) { body.appendChild(r); });"
    assert sort_line in html
    broken = page.parent / "broken-sort.html"  # beside the PNGs
    broken.write_text(html.replace(sort_line, "").replace(csp, ""))
    open_page(driver, broken)
    assert_no_console_errors(driver)
    with pytest.raises(AssertionError, match="not sorted"):
        assert_sorts(driver, SPEARMAN, numeric=True)
    assert driver.find_elements("css selector", "#fidelity th[aria-sort]")  # the script did run


def test_blank_check_catches_a_white_page(driver, tmp_path):
    white = tmp_path / "white.html"
    white.write_text("<!DOCTYPE html><html><body style='background:#fff'></body></html>")
    open_page(driver, white)
    with pytest.raises(AssertionError, match="blank screenshot"):
        assert_not_blank(driver.get_screenshot_as_png())
