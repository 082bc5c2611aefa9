"""The report as a person sees it: opened in Debian's headless Chromium through selenium, it shows no console
error, requests nothing over the network, every image loads, every chart has a size, and choosing another
checkpoint changes the gallery, for a multi-class and a binary run on one page; its val images are refused
in one line when the shards were made in a scheme other than the run's."""

import json
import shutil
from types import SimpleNamespace

import pytest

from conftest import base_overrides, run_cli, run_train
from distseg.config import load_config
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.reporting.report import val_images

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium + chromium-driver here (tools/test.sh installs them with apt as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                "--window-size=1300,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(person_shards, one_proc_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run_train(base_overrides(person_shards, tmp, "person", **{"data.scheme": "person",
                                                             "train.ckpt_every": 2}))
    out = tmp / "report.html"
    args = ["report", one_proc_run, tmp / "person", "--out", out, "--images", "4", "--checkpoints", "3"]
    p = run_cli(*args)
    assert "report written to" in p.stdout
    # progress while it builds, one run at a time
    assert "report 1/2: one: scoring the val split" in p.stdout and "report 2/2: person done in" in p.stdout
    # nothing changed: not rebuilt; a run that changes: the fingerprint does
    built = out.stat().st_mtime_ns
    p = run_cli(*args)
    assert "is up to date" in p.stdout and "scoring" not in p.stdout and out.stat().st_mtime_ns == built
    from distseg.reporting.report import inputs_fingerprint
    from distseg.runs.run_dir import RunDir

    dirs = [RunDir(one_proc_run), RunDir(tmp / "person")]
    before = inputs_fingerprint(dirs, 4, 3, "no", "auto")
    assert before != inputs_fingerprint(dirs, 5, 3, "no", "auto")
    summary = tmp / "person" / "summary.json"
    summary.touch()
    assert before != inputs_fingerprint(dirs, 4, 3, "no", "auto")
    return out


def visible_predictions(driver, run: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-run=\"' + arguments[0] + '\"] .predictions img'))"
        ".filter(i => i.offsetParent !== null).map(i => i.src);", run)


def test_val_images_refuse_shards_of_another_scheme_in_one_line(shards):
    run = SimpleNamespace(cfg=load_config(None, [f"data.shards={shards}"]), scheme=get_scheme("category"))
    with pytest.raises(UserError, match="sharded with scheme 'trainid' but the config asks for 'category'") \
            as e:
        val_images(run, 2)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_report_in_a_real_browser(browser, page):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(page.as_uri())
    # chromedriver may hand back a file:// page still loading when the machine is busy: the page must then
    # finish loading within the wait, or the test fails
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    requested = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requested if m["method"] == "Network.requestWillBeSent"]
    assert page.as_uri() in urls  # the page came from disk, and nothing came over the network
    assert not [u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")], urls
    images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, "
                                    "i.naturalWidth])")
    assert len(images) >= 2 * 4 * (2 + 2 * 3) and all(ok and w > 0 for ok, w in images)
    charts = browser.execute_script("return Array.from(document.querySelectorAll('figure.chart svg'))"
                                    ".map(s => {const r = s.getBoundingClientRect(); return [r.width, "
                                    "r.height];})")
    assert len(charts) == 3 + 2 and all(w > 0 and h > 0 for w, h in charts), charts  # curves + a heatmap each
    for run in (0, 1):  # multi-class, then binary
        select = Select(browser.find_element("css selector", f'select.checkpoint[data-run="{run}"]'))
        assert [o.text for o in select.options][0] == "best" and len(select.options) == 3
        before = visible_predictions(browser, run)
        select.select_by_index(2)
        after = visible_predictions(browser, run)
        assert len(before) == len(after) == 8 and before != after
    assert page.stat().st_size < 15 << 20
