"""Headless Chromium for the tests that check what a user sees in report.html.

`chromium()` finds Debian's Chromium, installing it with apt-get when it is missing (as the
Slurm tests install Slurm); `Unavailable` when that cannot be done. `inspect()` loads a page
in a frame of a small probe page and returns what a user would see: the verdict's text, the
table's rows and which images decoded. `screenshot()` renders the page to a PNG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# closed network refuses; a fresh profile keeps runs independent.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

PROBE = """<!DOCTYPE html><html><body><iframe id="page" src="{src}" style="width:1200px;height:2400px"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {{
  const doc = document.getElementById("page").contentDocument;
  const images = [...doc.images];
  const verdict = doc.getElementById("verdict");
  const result = {{
    verdict: verdict ? verdict.textContent : null,
    table_rows: doc.querySelectorAll("#comparison tbody tr").length,
    images: images.length,
    decoded: images.filter(img => img.complete && img.naturalWidth > 0).length,
    gallery: doc.querySelectorAll("#gallery .card img").length,
    overflowing: [...doc.querySelectorAll("#gallery, #gallery .card")].filter(
      e => e.scrollWidth > e.clientWidth + 1).length,
  }};
  const out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
}});
</script></body></html>"""


class Unavailable(Exception):
    """No Chromium here and none can be installed."""


def chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("Chromium is not installed and apt-get cannot install it here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not shutil.which("chromium"):
        raise Unavailable(f"apt-get could not install chromium: {result.stderr.strip()[-300:]}")
    return shutil.which("chromium")


def _run(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120)


def inspect(page: Path) -> dict:
    """What the loaded page shows, read through the DOM of a probe page framing it."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(PROBE.format(src=page.resolve().as_uri()))
        # File pages may read frames of other file pages only with this flag (test-only).
        done = _run("--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    if not found:
        raise AssertionError(f"the probe page reported nothing; chromium said: {done.stderr[-500:]}")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1600) -> Path:
    _run(f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri())
    if not png.is_file():
        raise AssertionError(f"chromium wrote no screenshot of {page}")
    return png
