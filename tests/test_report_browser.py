"""report.html in a real headless browser (Debian's chromium): it renders, every image loads, no console errors.

Skipped, with the reason, where /usr/bin/chromium is absent. The report itself carries no script; the test loads a
copy with a small probe script that, once the page has loaded, writes the image count and any error into the DOM,
which `--dump-dom` prints.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tokprof.reports.render import render_report

CHROMIUM = Path("/usr/bin/chromium")
DATA = Path(__file__).resolve().parent / "data"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no headless browser: /usr/bin/chromium (Debian's "
                                "chromium package) is not installed on this machine")

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(String(e.message || ("failed to load " +
    (e.target && (e.target.src || e.target.href) || e.type)).slice(0, 80))), true);
const consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); consoleError(...args); };
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  const marker = document.createElement("pre");
  marker.id = "tokprof-probe";
  marker.textContent = `PROBE images ${ok}/${imgs.length} errors ${window.__errors.length}: ` +
      window.__errors.join(" | ");
  document.body.appendChild(marker);
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=10000",
         "--enable-logging=stderr", "--v=0"]


def test_report_renders_in_headless_chromium(tmp_path):
    report = render_report([DATA / "run_h100.json", DATA / "run_h200.json"], tmp_path / "report")
    page = tmp_path / "probe.html"
    page.write_text(report.html.read_text().replace("<head>", "<head>\n" + PROBE, 1))
    profile = tmp_path / "profile"  # fresh user-data-dir: no state from any earlier browser run
    try:
        proc = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    match = re.search(r"PROBE images (\d+)/(\d+) errors (\d+):([^<]*)", proc.stdout)
    assert match, f"the probe never ran (page did not load?); stderr: {proc.stderr[-2000:]}"
    ok, total, errors, text = int(match[1]), int(match[2]), int(match[3]), match[4]
    assert total == len(report.figures), f"{total} <img> in the page, {len(report.figures)} figures written"
    assert ok == total, f"only {ok} of {total} images loaded"
    assert errors == 0, f"page errors: {text}"
    console_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert console_errors == [], console_errors
    assert "<h1>tokprof report</h1>" in proc.stdout  # it rendered the document, not an error page
