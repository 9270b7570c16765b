"""The chat page at `/`, end to end in a real headless Chromium (Debian's, driven by Selenium).

Two ranks serve a tiny model through `mlxnode launch -- serve` with an API key; the browser
types the key and a prompt, and the streamed answer must equal the API's greedy answer for
the same prompt; the page must show tokens/s and both ranks. A screenshot is saved under the
test's tmp dir and its path printed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_engine import _free_ports
from test_serve import API_KEY, MAX_TOKENS, PROMPT, serving

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ANSWER_TIMEOUT = 60.0

pytestmark = pytest.mark.slow


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1100,900")
    # Given both paths, Selenium Manager has nothing to fetch.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_the_chat_page_streams_the_apis_greedy_answer_and_shows_the_ranks(
    local_cluster, tmp_path, monkeypatch
):
    if not (os.access(CHROMIUM, os.X_OK) and shutil.which(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (make setup installs them)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium download a browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    launch = [
        str(local_cluster.venv_bin / "mlxnode"), "launch",
        "--hostfile", str(local_cluster.hostfile), "--starting-port", str(_free_ports(2)),
        "--run-id", f"chat-page-{os.getpid()}", "--",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    env["HOME"] = str(tmp_path / "home")
    env["MLXNODE_SERVE_API_KEY"] = API_KEY
    # --host: through mlx.launch, which must not take it for its own --hosts.
    args = ["--max-tokens", str(MAX_TOKENS), "--host", "127.0.0.1"]
    with serving(local_cluster.model, *args, launch=launch, env=env, cwd=tmp_path) as server:
        expected = (
            server.client(API_KEY)
            .chat.completions.create(
                model="m", messages=[{"role": "user", "content": PROMPT}], temperature=0
            )
            .choices[0]
            .message.content
        )
        assert expected
        # The page itself is open; what it reads of the cluster needs the key.
        page = server.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert server.get("/v1/cluster").status_code == 401

        browser = _browser()
        try:
            browser.get(server.url + "/")
            browser.find_element(By.ID, "api-key").send_keys(API_KEY)
            browser.find_element(By.ID, "prompt").send_keys(PROMPT)
            started = time.monotonic()
            browser.find_element(By.ID, "send").click()

            # Watch the answer grow until the stream ends.
            seen: list[str] = []

            def answered(driver) -> bool:
                state, text = driver.execute_script(
                    "const m = document.querySelector('.msg.assistant');"
                    "return m ? [m.dataset.state, m.textContent] : [null, ''];"
                )
                if text and (not seen or seen[-1] != text):
                    seen.append(text)
                return state in ("done", "error")

            WebDriverWait(browser, ANSWER_TIMEOUT, poll_frequency=0.02).until(answered)
            answer = browser.execute_script(
                "return document.querySelector('.msg.assistant').textContent"
            )
            assert answer == expected, f"page {answer!r} != API {expected!r}"
            assert all(expected.startswith(part) for part in seen), seen
            stats = browser.find_element(By.ID, "stats").text
            assert "tokens/s" in stats and f"{MAX_TOKENS} tokens" in stats, stats

            # Both ranks and their host, once the page has read /v1/cluster with the key.
            # The page redraws the table on every poll, so the rows are read in one
            # script call: element handles found earlier can go stale in between.
            def rank_rows(driver) -> list[str] | None:
                rows = driver.execute_script(
                    "return [...document.querySelectorAll('#cluster tr.rank')]"
                    ".map(r => r.innerText);"
                )
                return rows if len(rows) == 2 else None

            rows = WebDriverWait(browser, 10).until(rank_rows)
            assert [r.split()[0] for r in rows] == ["0", "1"], rows
            assert "2 rank(s)" in browser.find_element(By.ID, "model").text
            assert browser.find_element(By.ID, "ready").text == "ready"

            shot = Path(tmp_path) / "chat-page.png"
            assert browser.save_screenshot(str(shot))
            print(f"chat page screenshot: {shot} ({time.monotonic() - started:.1f} s to answer)")
        finally:
            browser.quit()
