"""The Ray dashboard as a user sees it during `online-dpo train --job`: headless Chromium opens the address
the CLI prints, enters the token `ray get-auth-token` prints, finds the run's actors by name, and finds
the run's step lines in its job's log on the Jobs page."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="Chromium is not installed (apt-get install chromium chromium-driver; "
                                       ".ci/run does)")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1200", f"--user-data-dir={os.environ.get('TMPDIR', '/tmp')}/chromium-{os.getpid()}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_the_dashboard_shows_the_named_actors_and_the_jobs_log(tmp_path, embedded_model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "train.log"
    run = subprocess.Popen([sys.executable, "-m", "online_dpo.cli", "train", "--job", "--set", f"run.output_dir={tmp_path}",
                            "--set", "train.max_steps=400", "--set", "train.max_kl=null"],
                           cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    driver = None
    try:
        deadline = time.time() + 300
        while "step    3/" not in log.read_text():
            assert run.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        url = re.search(r"Ray dashboard: (http://\S+)", log.read_text()).group(1)
        token = subprocess.run([str(ROOT / ".venv" / "bin" / "ray"), "get-auth-token"], capture_output=True,
                               text=True, timeout=60).stdout.strip().splitlines()[-1]
        driver = browser()
        driver.get(url + "/#/actors")
        wait = WebDriverWait(driver, 60)
        box = wait.until(lambda d: d.find_element(By.XPATH, "//input[@placeholder='Enter your authentication token']"))
        box.send_keys(token)
        driver.find_element(By.XPATH, "//button[contains(translate(., 'submit', 'SUBMIT'), 'SUBMIT')]").click()
        size = wait.until(lambda d: d.find_element(By.XPATH, "//input[@value='10']"))   # the page size
        size.send_keys(Keys.CONTROL, "a")
        size.send_keys("50")

        def shown(d):
            text = d.find_element(By.TAG_NAME, "body").text
            return all(name in text for name in ("sampler-0", "judge-0", "broker", "policy-store")) and text

        text = wait.until(shown)
        assert "Authentication Token Required" not in text and "RayTrainWorker" in text
        job = re.search(r"submitted as Ray job (\S+):", log.read_text()).group(1)
        driver.get(url + f"/#/jobs/{job}")
        step_line = re.compile(r"step\s+\d+/400\s+pairs\s+\d+\s+reward")
        page = wait.until(lambda d: step_line.search(d.find_element(By.TAG_NAME, "body").text) and
                          d.find_element(By.TAG_NAME, "body").text)
        assert job in page
    finally:
        if driver is not None:
            driver.quit()
        run.send_signal(signal.SIGTERM)
        run.wait(180)
    out = log.read_text()
    assert run.returncode == 143 and "stopped by SIGTERM" in out, out[-3000:]   # passed on to the job's driver
