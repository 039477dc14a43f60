"""The screenshot of the web UI in docs/serve.md: the real `motif-video serve` (shipped nano model) in headless
Chromium, with a few finished videos in the gallery and one job running with its live preview.

    python benchmarks/serve_screenshot.py docs/images/serve_ui.png
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Server  # noqa: E402

FINISHED = [("a red circle moving left", 3), ("a blue square moving up", 8), ("a yellow triangle moving right", 5),
            ("a green circle moving down", 11), ("a white square moving left", 2)]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/serve_ui.png")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory(prefix="serve-shot-") as tmp:
        server = Server(None, Path(tmp) / "data", [], Path(tmp) / "server.log")
        try:
            with httpx.Client(base_url=server.url, timeout=60) as api:
                ids = [api.post("/v1/videos", json={"prompt": p, "seed": s}).json()["id"] for p, s in FINISHED]
                for job_id in ids:
                    while api.get(f"/v1/videos/{job_id}").json()["status"] != "completed":
                        time.sleep(0.5)
            options = webdriver.ChromeOptions()
            options.binary_location = shutil.which("chromium")
            for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1240",
                         "--hide-scrollbars"):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
            try:
                driver.get(server.url)
                time.sleep(2)
                driver.find_element(By.ID, "prompt").send_keys("a magenta circle moving right")
                driver.find_element(By.ID, "steps").clear()
                driver.find_element(By.ID, "steps").send_keys("60")
                driver.find_element(By.ID, "seed").send_keys("42")
                driver.find_element(By.ID, "generate").click()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and driver.execute_script(
                        "return document.getElementById('current-progress').value") < 45:
                    time.sleep(0.2)
                time.sleep(0.8)  # let the preview image and the gallery repaint
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
            finally:
                driver.quit()
        finally:
            server.stop()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
