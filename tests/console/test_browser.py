"""The console in a real browser (Debian's headless Chromium through chromedriver) over a running demo.

`fedpeft-edge demo --console` runs a real federation (MiniLM LoRA on Reuters R8, two agents, Mosquitto)
with the console beside it. Chromium signs in as the operator, sees both sites, presses "Pause
federation": both agents report paused (and the aggregator closes no round); it takes screenshots in
English and Japanese, presses "Resume", and the run ends with every round complete and every update
counted once. A second browser session signs in as a viewer: every action it tries is refused with 403.
Screenshots go to the test's folder, and to docs/ when FEDPEFT_EDGE_SCREENSHOTS_TO_DOCS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_fixtures import require_mosquitto

from fedpeft_edge.console.auth import UserStore

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OPERATOR = ("plant-operator", "op-password-123")
VIEWER = ("plant-viewer", "viewer-password-123")
AGENTS, ROUNDS = 2, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _browser(lang: str):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "Debian's chromium and chromium-driver are needed for the browser tests (scripts/install.sh)"
    )
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1150",
        f"--lang={lang}",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"intl.accept_languages": lang})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _sign_in(driver, base: str, user: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(base + "/login")
    driver.find_element(By.ID, "username").send_keys(user[0])
    driver.find_element(By.ID, "password").send_keys(user[1])
    driver.find_element(By.ID, "login-button").click()
    _wait(lambda: driver.current_url.endswith("/fleet"), 20, f"{user[0]} to reach the fleet page")


def _site_states(driver) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:  # the page replaces its content every few seconds: read it in one go
        return {
            row.get_attribute("data-site"): row.get_attribute("data-state")
            for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-site]")
        }
    except StaleElementReferenceException:
        return {}


def _click(driver, selector: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(10):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError(f"could not click {selector}")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path, Path]]:
    require_mosquitto()
    users = tmp_path / "console-users.json"
    store = UserStore(users)
    store.add(*OPERATOR, "operator")
    store.add(*VIEWER, "viewer")
    config = tmp_path / "demo.toml"
    # Not --quick (it caps the rounds at 2): enough rounds that the pause lands mid-federation.
    config.write_text(
        f"[demo]\nagents = {AGENTS}\nrounds = {ROUNDS}\nlocal_steps = 8\ntrain_size = 160\n"
        'test_size = 96\nmax_len = 32\nbroker = "mosquitto"\n'
    )
    port = _free_port()
    out, work, log = tmp_path / "report", tmp_path / "work", tmp_path / "demo.log"
    cmd = [
        sys.executable,
        "-m",
        "fedpeft_edge",
        "demo",
        "--config",
        str(config),
        "--plain",
        "--console",
        "--console-port",
        str(port),
        "--console-users",
        str(users),
        "--out",
        str(out),
        "--work-dir",
        str(work),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env
        )
    try:
        base = f"http://localhost:{port}"
        _wait(
            lambda: f"operator console: {base}/" in log.read_text(errors="replace"),
            600,
            "the demo to print the console URL",
            proc,
            log,
        )
        yield base, proc, out, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_pause_resume_in_the_browser_and_a_viewer_is_refused(demo, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    base, proc, out, log = demo
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = _browser("en")
    viewer = _browser("ja")
    try:
        _sign_in(driver, base, OPERATOR)
        sites = {f"site-{i + 1}" for i in range(AGENTS)}
        _wait(lambda: set(_site_states(driver)) == sites, 300, "both sites on the fleet page", proc, log)

        # Let two rounds close first (the charts then have points), then pause the federation: both agents
        # report paused, and so does the aggregator.
        def api() -> dict:
            return json.loads(driver.execute_script("return fetch('/api/fleet').then(r => r.text())"))

        _wait(lambda: (api()["round"] or 0) >= 2, 300, "round 2", proc, log)
        _click(driver, "#pause-federation")
        _wait(lambda: "sent=" in driver.current_url, 20, "the pause to be sent")
        _wait(lambda: set(_site_states(driver).values()) == {"paused"}, 120, "both sites paused", proc, log)
        _wait(lambda: driver.find_elements(By.ID, "paused-banner"), 30, "the federation's paused banner")
        paused_round = api()["round"]
        assert proc.poll() is None, "the demo ended while paused"

        # Screenshots of the paused fleet and the federation, in both languages.
        for lang in ("en", "ja"):
            driver.get(f"{base}/lang/{lang}?back=/fleet")
            time.sleep(0.5)
            driver.save_screenshot(str(shots / f"console-fleet-{lang}.png"))
            driver.get(base + "/federation")
            time.sleep(0.5)
            driver.save_screenshot(str(shots / f"console-federation-{lang}.png"))
        assert "連合学習は一時停止中です" in driver.page_source
        driver.get(f"{base}/lang/en?back=/fleet")

        # While paused no round closes (the round stays where it was for a few seconds).
        time.sleep(4)
        now = api()
        assert now["round"] == paused_round and now["paused"]

        # A viewer sees the same fleet but every action is refused (403), in the browser as over HTTP.
        _sign_in(viewer, base, VIEWER)
        assert set(_site_states(viewer)) == sites
        assert viewer.find_element(By.ID, "who").get_attribute("data-role") == "viewer"
        for selector in (
            "#resume-federation",
            "#close-round",
            'button[data-action="resume"][data-site="site-1"]',
            'button[data-action="exclude"][data-site="site-2"]',
        ):
            viewer.get(base + "/fleet")
            _click(viewer, selector)
            if "exclude" in selector or "close-round" in selector:  # the confirm() dialog
                viewer.switch_to.alert.accept()
            _wait(lambda: viewer.find_elements(By.ID, "forbidden"), 10, f"403 for {selector}")
            assert "権限がありません" in viewer.page_source
        statuses = viewer.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const csrf = document.querySelector('input[name=csrf]').value;
            const acts = [['pause', ''], ['resume', ''], ['close_round', ''], ['pause', 'site-1'],
                          ['resume', 'site-1'], ['exclude', 'site-2'], ['include', 'site-2']];
            Promise.all(acts.map(([a, s]) => fetch('/action', {method: 'POST', body: new URLSearchParams(
                {csrf: csrf, action: a, site: s, back: '/fleet'}), redirect: 'manual'}).then(r => r.status)))
              .then(done);""")
        assert statuses == [403] * 7
        assert set(_site_states(driver).values()) == {"paused"}  # nothing the viewer did took effect

        # Resume: the run continues to its end with nothing lost.
        driver.get(base + "/fleet")
        _click(driver, "#resume-federation")
        _wait(lambda: proc.poll() is not None, 900, "the demo to finish after resume", None, log)
        assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    finally:
        driver.quit()
        viewer.quit()

    summary = json.loads((out / "report.json").read_text())
    assert summary["ok"] and len(summary["rounds"]) == ROUNDS
    assert all(r["participants"] == AGENTS for r in summary["rounds"]), summary["rounds"]
    events = [
        json.loads(x) for x in (out.parent / "work" / "console" / "events.jsonl").read_text().splitlines()
    ]
    actions = [(e["by"], e["data"]["action"]) for e in events if e["kind"] == "action"]
    assert actions == [(OPERATOR[0], "pause"), (OPERATOR[0], "resume")]
    refused = [e for e in events if e["kind"] == "action_refused"]
    assert len(refused) >= 4 + 7 and {e["by"] for e in refused} == {VIEWER[0]}
    confirmed = {e["site"] for e in events if e["kind"] == "confirmed"}
    assert {"aggregator", *{f"site-{i + 1}" for i in range(AGENTS)}} <= confirmed
    for name in (
        "console-fleet-en.png",
        "console-fleet-ja.png",
        "console-federation-en.png",
        "console-federation-ja.png",
    ):
        assert (shots / name).stat().st_size > 10_000, name
    if os.environ.get("FEDPEFT_EDGE_SCREENSHOTS_TO_DOCS") == "1":
        for name in ("console-fleet-en.png", "console-federation-ja.png"):
            shutil.copy(shots / name, REPO / "docs" / name)
