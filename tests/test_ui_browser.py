"""The web app in a real browser (headless Chromium under Selenium) against `python -m app ui` as a process: label
six prompts on the tiny run's GGUF (reloading half-way, which must resume), train DPO on those labels from the
page, watch the chart and the run finish, then the runs, compare and chat pages. Screenshots of each page are
saved in the test's tmp_path.

Needs Debian's chromium and chromium-driver (`make test` installs them); skipped without them."""
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from app import ROOT
from app.recipe import run_recipe
from app.runs import EXPORTS
from tests.test_serve import free_port

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPTS = ["What is the sun?", "Tell me about bees.", "Can you explain rain?", "What is a tree?",
           "Please describe music.", "Tell me about the moon."]
STEPS = 10  # two logged points at tiny's logging_steps 5

pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium "
                                       "chromium-driver; make test does)")


@pytest.fixture
def app_url(tmp_path):
    """The address `python -m app ui` prints (with its token), while the server runs."""
    port, out = free_port(), tmp_path / "ui.out"
    with open(out, "w") as stdout:
        server = subprocess.Popen([sys.executable, "-m", "app", "ui", "--port", str(port)], cwd=ROOT, stdout=stdout,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while "token=" not in out.read_text():
            assert server.poll() is None and time.time() < deadline, f"the app did not start:\n{out.read_text()}"
            time.sleep(0.2)
        yield out.read_text().split()[3]  # "prefalign web app: http://127.0.0.1:PORT/?token=..."
    finally:
        server.send_signal(signal.SIGTERM)  # stops a training it started too
        server.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def work_folder():
    """The prompts file and the labels in a folder of exports/ (the app reads and writes only there)."""
    folder = EXPORTS / f"ui-browser-{os.getpid()}"
    folder.mkdir(parents=True)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_label_train_and_compare_in_a_browser(tiny_run, app_url, browser, work_folder, new_runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(condition, seconds=30):
        return WebDriverWait(browser, seconds, poll_frequency=0.2).until(lambda _: condition())

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def shot(name: str):
        browser.save_screenshot(str(tmp_path / f"{name}.png"))

    base = app_url.split("/?")[0]
    browser.get(app_url)  # the printed address: the token becomes the page's cookie
    assert browser.current_url.startswith(base + "/label")

    labels = work_folder / "labels.jsonl"
    page = base + "/label?" + urllib.parse.urlencode({
        "model": str((tiny_run / "gguf" / "tiny-f16.gguf").relative_to(ROOT)),
        "prompts": str((work_folder / "prompts.txt").relative_to(ROOT)), "labels": str(labels.relative_to(ROOT))})

    def label(n: int):
        """Label the prompt on screen: A, B, A, ... by key, once editing A first; a tie when they are equal."""
        wait(lambda: f"prompt {n} of 6" in text("counts") and browser.find_element(By.ID, "a").get_attribute("value")
             not in ("", "…sampling"))
        a, b = (browser.find_element(By.ID, x).get_attribute("value") for x in ("a", "b"))
        if n == 5:  # edit the preferred reply, then pick it with its button
            browser.find_element(By.ID, "a").send_keys(" Thanks for asking.")
            shot("label")
            browser.find_element(By.ID, "pick-a").click()
        else:
            browser.find_element(By.TAG_NAME, "body").send_keys("t" if a == b else "12"[n % 2])
        if n < 6:
            wait(lambda: f"prompt {n + 1} of 6" in text("counts"))

    browser.get(page)
    for n in range(1, 4):
        label(n)
    browser.refresh()  # reopening resumes at the first unlabeled prompt
    wait(lambda: "prompt 4 of 6" in text("counts"))
    for n in range(4, 7):
        label(n)
    wait(lambda: browser.find_element(By.ID, "done").is_displayed())
    pairs, undecided = (len(p.read_text().splitlines()) if p.is_file() else 0
                        for p in (labels, work_folder / "labels.undecided.jsonl"))
    assert pairs + undecided == 6 and pairs >= 4 and f"pairs {pairs} · ties {undecided}" in text("counts")
    assert "Thanks for asking." in labels.read_text()

    browser.find_element(By.ID, "train-link").click()  # the train page, with these labels as its data
    wait(lambda: browser.find_element(By.ID, "data").get_attribute("value") == str(labels.relative_to(ROOT)))
    browser.find_element(By.ID, "max_steps").send_keys(str(STEPS))
    browser.find_element(By.ID, "start").click()
    wait(lambda: browser.find_element(By.ID, "status").get_attribute("data-state") == "running")
    state = wait(lambda: browser.find_element(By.ID, "status").get_attribute("data-state") in ("done", "failed")
                 and browser.find_element(By.ID, "status").get_attribute("data-state"), seconds=240)
    wait(lambda: int(browser.find_element(By.ID, "chart-loss").get_attribute("data-points") or 0) >= 2)
    shot("train")
    assert state == "done", text("log")[-3000:]
    assert f"step   {STEPS}/{STEPS}" in text("log") and "done in" in text("log")
    (run,) = new_runs("tiny-dpo-")
    assert run_recipe(run).data.source == str(labels.relative_to(ROOT))  # trained on the labels

    browser.get(base + "/runs?run=" + run.name)
    wait(lambda: run.name in text("runs") and "PASS" in text("details"))
    assert browser.find_elements(By.CSS_SELECTOR, "img.plot")
    shot("runs")

    browser.get(base + "/compare?run=" + run.name)
    wait(lambda: browser.find_elements(By.CSS_SELECTOR, "button.probe"))
    browser.find_elements(By.CSS_SELECTOR, "button.probe")[0].click()
    wait(lambda: text("aligned") not in ("", "…") and text("base") not in ("", "…"))
    assert browser.find_element(By.ID, "base").get_attribute("data-missing") == "false"  # export.base from the form
    shot("compare")

    browser.get(base + "/chat")
    wait(lambda: browser.find_element(By.ID, "model").get_attribute("value"))
    browser.find_element(By.ID, "message").send_keys("What is the sun?\n")
    wait(lambda: "assistant:" in text("turns"))
    shot("chat")
