"""Report size and render time at real-model geometry (synthetic traces, no model), in headless Chromium.

    python benchmarks/bench_report.py                 # LLaVA-1.5 (576 image tokens) and NeXT (2,928)
    python benchmarks/bench_report.py --steps 24 --chromium /usr/bin/chromium

For each geometry (32 layers x 32 heads, random fp16 attention rows) it writes ``report.html`` and
prints its size; then drives Chromium over the DevTools pipe (real time, not virtual) and measures
side by side, on the same browser: a blank page's load, the report's load until its first layer's
circuitsvis view exists, and opening each further layer tab until its view exists. Every canvas of
every opened tab is checked non-zero. On a shared machine the absolute times scale with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from llava_lens.views.export import write_manifest
from llava_lens.views.report import write_report
from llava_lens.views.synthetic import synthetic_trace

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-webgl", "--disable-software-rasterizer",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--remote-debugging-pipe"]

READY = """(function () {
  var v = document.querySelector(".layer-view.active");
  if (!v || !v.querySelector(".cv-patterns h4")) { return null; }
  var cs = v.querySelectorAll("canvas"), bad = 0;
  for (var k = 0; k < cs.length; k++) { if (!cs[k].width || !cs[k].height || !cs[k].offsetWidth) { bad++; } }
  var hm = document.getElementById("heatmap-canvas");
  return {canvases: cs.length, zero: bad, heatmap: hm ? hm.width * hm.height : 0};
})()"""


class Browser:
    """Minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, chromium: str, profile: str):
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def fds() -> None:
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                self._buf += os.read(self._read, 1 << 20)
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]

    def eval(self, expression: str):
        out = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        return out["result"].get("value")

    def wait(self, expression: str, timeout: float = 120.0):
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            value = self.eval(expression)
            if value:
                return value, time.perf_counter() - start
            time.sleep(0.02)
        raise TimeoutError(expression)

    def load(self, uri: str) -> float:
        start = time.perf_counter()
        self.call("Page.navigate", self.session, url=uri)
        self.wait("document.readyState === 'complete'")
        return time.perf_counter() - start

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def measure(browser: Browser, report: Path, blank: Path) -> dict:
    blank_s = browser.load(blank.as_uri())
    start = time.perf_counter()
    browser.call("Page.navigate", browser.session, url=report.as_uri())
    first, _ = browser.wait(READY)
    first_s = time.perf_counter() - start
    ids = browser.eval("Array.prototype.map.call(document.querySelectorAll('.layer-view'), function (v) "
                       "{ return v.id; })")
    tabs = []
    for view in ids[1:]:
        browser.eval(f"var s = document.getElementById('layer-select'); s.value = '{view}'; "
                     "s.dispatchEvent(new Event('change'));")
        state, seconds = browser.wait(READY)
        tabs.append((view, seconds, state))
    return {"blank_s": blank_s, "first_s": first_s, "first": first, "tabs": tabs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        blank = Path(tmp) / "blank.html"
        blank.write_text("<!DOCTYPE html><html><body>blank</body></html>")
        for name, kwargs in [("llava-1.5 (576 image tokens)", dict(prefill_layers=(0, 31))),
                             ("llava-next (2,928 image tokens)", dict(next_grid=(48, 48)))]:
            run = Path(tmp) / name.split()[0]
            trace = synthetic_trace(args.steps, **kwargs)
            trace.save(run)
            write_manifest(run, trace, {"trace": [run / "trace.json", run / "trace.safetensors"],
                                        "image": [run / "image.png"]}, {})
            start = time.perf_counter()
            report = write_report(run)
            write_s = time.perf_counter() - start
            browser = Browser(args.chromium, str(Path(tmp) / f"profile-{run.name}"))
            try:
                m = measure(browser, report, blank)
            finally:
                browser.close()
            tab_s = [s for _, s, _ in m["tabs"]]
            bad = sum(state["zero"] for _, _, state in m["tabs"]) + m["first"]["zero"]
            print(f"{name}, {args.steps} steps: {report.stat().st_size / 1e6:.2f} MB, written in {write_s:.1f} s; "
                  f"{1 + len(tab_s)} layer tabs")
            print(f"  blank page load {m['blank_s']:.2f} s | report load to first layer view "
                  f"{m['first_s']:.2f} s ({m['first_s'] / max(m['blank_s'], 1e-3):.1f}x blank)")
            if tab_s:
                median = sorted(tab_s)[len(tab_s) // 2]
                print(f"  open another layer tab: median {median:.2f} s, max {max(tab_s):.2f} s; "
                      f"canvases per tab {m['first']['canvases']}, zero-sized {bad}")


if __name__ == "__main__":
    main()
