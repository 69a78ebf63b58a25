"""The web UI as a person uses it, in a real headless Chromium (Debian's, through Selenium).

One pass over the whole job: log in, upload the example data, read its validation report,
start a tiny-llama run, watch the loss curve gain points, stop and resume it, export a
GGUF and chat with it. A screenshot of each page goes to tests/.screenshots/ (ignored by git).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ui_support import EXAMPLE, PASSWORD, USER, ui_server

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = Path(__file__).parent / ".screenshots"
# Enough steps that Stop lands mid-run even on a fast, quiet machine, where a tiny-llama step of
# 128 tokens takes a few milliseconds (30 steps ended before Stop there).
STEPS = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver"),
]


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(_: Any) -> Any:
        try:
            return condition()
        except StaleElementReferenceException:
            return False

    return WebDriverWait(None, timeout, poll_frequency=0.5).until(check, f"timed out waiting for {what}")


def shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def test_login_upload_validate_train_stop_resume_export_chat(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    upload = tmp_path / "my_chat.jsonl"
    shutil.copy(EXAMPLE, upload)
    find = browser.find_element
    with ui_server(tmp_path / "ws") as server:
        # Log in: every page sends a visitor without a session to the login form.
        browser.get(server.url + "/data")
        assert browser.current_url.endswith("/login")
        shot(browser, "1-login")
        find(By.ID, "user").send_keys(USER)
        find(By.ID, "password").send_keys(PASSWORD)
        find(By.ID, "login").click()
        wait_for(lambda: browser.current_url.endswith("/data"), 30, "the Data page")

        # Upload the example data; the page shows its validation report and a preview.
        find(By.ID, "upload-file").send_keys(str(upload))
        find(By.ID, "upload").click()
        wait_for(lambda: find(By.ID, "report"), 120, "the validation report")
        assert (server.workspace / "uploads/my_chat.jsonl").read_bytes() == upload.read_bytes()
        assert find(By.ID, "report-ok").text == "ready to train"
        rows = sum(1 for line in upload.read_text().splitlines() if line.strip())
        assert find(By.ID, "rows-read").text == str(rows)
        assert int(find(By.ID, "loss-tokens").text) > 0
        assert browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bar")
        trained = browser.find_elements(By.CSS_SELECTOR, "pre.sample span.trained")
        assert trained and all(s.text for s in trained[:3])
        shot(browser, "2-data")

        # The training form, generated from the config dataclasses; a small, fast run.
        find(By.ID, "train-this").click()
        wait_for(lambda: find(By.ID, "train-form"), 30, "the Train page")
        assert Select(find(By.ID, "data")).first_selected_option.text == "uploads/my_chat.jsonl"
        assert find(By.ID, "f-lora_r").get_attribute("placeholder") == "8"  # tiny-llama's preset rank
        find(By.ID, "name").clear()
        find(By.ID, "name").send_keys("e2e")
        for field, value in {
            "steps": str(STEPS),
            "f-max_seq_length": "128",
            "f-micro_batch": "1",
            "f-grad_accumulation": "1",
            "f-save_every": "1",
        }.items():
            find(By.ID, field).clear()
            find(By.ID, field).send_keys(value)
        shot(browser, "3-train")
        find(By.ID, "start").click()

        # Watch: the loss curve gains points live, then Stop leaves a checkpoint.
        wait_for(lambda: browser.current_url.endswith("/runs/e2e"), 30, "the run page")
        chart_points = lambda: int(find(By.ID, "chart").get_attribute("data-points") or 0)  # noqa: E731
        wait_for(lambda: chart_points() >= 2, 180, "two points on the loss curve")
        assert find(By.ID, "state").text == "running"
        assert "run_id=" in find(By.ID, "log").text
        shot(browser, "4-watch")
        find(By.ID, "stop").click()
        wait_for(lambda: find(By.ID, "state").text == "stopped", 120, "the run to stop")
        stopped_at = chart_points()
        assert stopped_at < STEPS
        assert any((server.workspace / "runs/e2e/checkpoints").glob("step-*"))

        # Resume continues from the checkpoint to the end; the summary shows.
        find(By.ID, "resume").click()
        wait_for(lambda: find(By.ID, "state").text == "finished", 480, "the resumed run to finish")
        wait_for(lambda: chart_points() == STEPS, 30, "every step on the curve")
        assert f"Finished: {STEPS} steps" in find(By.ID, "summary").text
        shot(browser, "5-finished")

        # Export a GGUF with a chosen quantization, with progress, then chat with it.
        Select(find(By.ID, "format")).select_by_visible_text("gguf")
        Select(find(By.ID, "quantization")).select_by_visible_text("q8_0")
        find(By.ID, "export").click()
        wait_for(lambda: find(By.ID, "export-state").text.startswith("done"), 120, "the export")
        gguf = Select(find(By.ID, "gguf")).first_selected_option.text
        assert gguf.endswith("-q8_0.gguf") and (server.workspace / gguf).is_file()
        find(By.ID, "chat-input").send_keys("What is 4 times 3?")
        find(By.ID, "send").click()
        reply = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-log p.assistant"), 120, "a reply")
        assert re.search(r"\(\d+ tokens\)$", reply[0].get_attribute("textContent"))
        assert not browser.find_elements(By.CSS_SELECTOR, "#chat-log p.error")
        shot(browser, "6-export-chat")

        # The run history (the store behind `backprop runs`) lists it; comparing opens both curves.
        run_id = find(By.ID, "run-id").text
        browser.get(server.url + "/runs")
        table = find(By.ID, "runs").text
        assert "e2e" in table and run_id[:8] in table and "completed" in table
        shot(browser, "7-runs")
        find(By.CSS_SELECTOR, 'input[name="a"][value="e2e"]').click()
        find(By.CSS_SELECTOR, 'input[name="b"][value="e2e"]').click()
        find(By.ID, "compare").click()
        wait_for(lambda: chart_points() == STEPS, 30, "the comparison chart")
        shot(browser, "8-compare")
    print(f"screenshots in {SHOTS}")
