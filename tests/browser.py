"""A page opened in Debian's headless Chromium with the network off, driven over the DevTools
protocol on a pipe (no library, no port): what it requested, what its console said, its text
once every figure is drawn, and a screenshot.

`python -m tests.browser PAGE.html OUT.png [WIDTH HEIGHT [ANCHOR]]` takes README's
screenshots (ANCHOR: the id of the section it starts at).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL = ("file:", "data:", "blob:", "about:", "chrome-error:")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Visit:
    """What the browser saw of a page."""

    text: str = ""  # the rendered DOM's text (document.body.innerText)
    drawn: int = 0  # figures whose plotly SVG is in the DOM
    figures: int = 0  # figure placeholders on the page
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    screenshot: bytes = b""
    result: Any = None  # what `script` returned

    @property
    def remote(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(LOCAL)]


class _Pipe:
    """DevTools messages: JSON, each ended by a NUL byte."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.w, self.r, self.buf, self.n = write_fd, read_fd, b"", 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.n += 1
        msg: dict[str, Any] = {"id": self.n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.n:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def evaluate(self, expression: str, session: str) -> Any:
        """A JS expression's value in the page (a promise awaited); its exception raised."""
        got = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session,
        )
        if "exceptionDetails" in got:
            raise RuntimeError(f"the page's script failed: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait_for(self, method: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(self._read())

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self.buf:
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed its pipe")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\0", 1)
        return json.loads(line)


DRAW_ALL = """(async () => {
  if (window.allconvReport) await window.allconvReport.drawAll();
  await new Promise(r => setTimeout(r, 300));
  return {
    text: document.body.innerText,
    drawn: document.querySelectorAll("div.plot .main-svg").length ? Array.from(
      document.querySelectorAll("div.plot")).filter(d => d.querySelector(".main-svg")).length : 0,
    figures: document.querySelectorAll("div.plot").length,
  };
})()"""


def visit(
    page: Path,
    width: int = 1280,
    height: int = 1600,
    timeout: float = 60,
    script: str | None = None,
    anchor: str | None = None,
) -> Visit:
    """Open `page` offline, draw every figure, and report what happened; `script`: a JS
    expression (a promise is awaited) run after the figures are drawn, its value returned;
    `anchor`: the id of the element the screenshot starts at (else the page's top)."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    profile = tempfile.mkdtemp(prefix="chromium-")
    args = [
        exe,
        "--headless=new",
        "--no-sandbox",  # root in CI; the page is ours
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        # no route out: every host name fails and any proxy use goes nowhere
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        f"--user-data-dir={profile}",
        "--remote-debugging-pipe",
        f"--window-size={width},{height}",
        "about:blank",
    ]

    def fds() -> None:  # the protocol's pipe is the browser's fds 3 (in) and 4 (out)
        into, out = os.dup(to_browser_r), os.dup(from_browser_w)  # neither is 3 or 4 now
        os.dup2(into, 3)
        os.dup2(out, 4)

    proc = subprocess.Popen(
        args,
        close_fds=False,  # fds 3 and 4 are made in the child, after Popen would close them
        preexec_fn=fds,
        stdout=subprocess.DEVNULL,
        stderr=None if os.environ.get("BROWSER_LOG") else subprocess.DEVNULL,
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    cdp = _Pipe(to_browser_w, from_browser_r)
    try:
        target = next(
            t["targetId"]
            for t in cdp.send("Target.getTargets")["targetInfos"]
            if t["type"] == "page"
        )
        s = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.send(f"{domain}.enable", session=s)
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            session=s,
        )
        cdp.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=s,
        )
        cdp.events.clear()
        cdp.send("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
        cdp.wait_for("Page.loadEventFired", timeout)
        value = cdp.evaluate(DRAW_ALL, s)
        result = None if script is None else cdp.evaluate(script, s)
        where = (
            f"document.getElementById({json.dumps(anchor)}).scrollIntoView()"
            if anchor
            else "window.scrollTo(0, 0)"
        )
        cdp.send("Runtime.evaluate", {"expression": where}, session=s)
        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, session=s)
        out = Visit(value["text"], value["drawn"], value["figures"], result=result)
        out.screenshot = base64.b64decode(shot["data"])
        for e in cdp.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Network.requestWillBeSent":
                out.requests.append(params["request"]["url"])
            elif method == "Network.loadingFailed":
                out.errors.append(f"load failed: {params.get('errorText')}")
            elif method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                out.errors.append(f"exception: {d.get('exception', {}).get('description') or d}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                said = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                out.errors.append(f"console: {said}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.errors.append(f"log: {params['entry']['text']}")
        return out
    finally:
        try:
            cdp.send("Browser.close")
        except (OSError, RuntimeError):
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_browser_w)
        os.close(from_browser_r)
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str]) -> int:
    page, out = Path(argv[0]), Path(argv[1])
    width, height = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (1280, 1600)
    seen = visit(page, width, height, anchor=argv[4] if len(argv) > 4 else None)
    out.write_bytes(seen.screenshot)
    print(f"{out}: {seen.drawn}/{seen.figures} figures drawn, {len(seen.errors)} errors, "
          f"{len(seen.remote)} remote requests")  # fmt: skip
    for e in seen.errors:
        print(e)
    return 0 if not seen.errors and not seen.remote else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
