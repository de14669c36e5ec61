"""Open an HTML file in headless Chromium and check it: every <img> loaded, no console error; save a screenshot.

    python scripts/browser_check.py runs/demo/knn_surfaces/report.html --screenshot docs/img/report.png

Talks the DevTools protocol over a pipe (`--remote-debugging-pipe`: NUL-terminated JSON on fds 3 and 4), so it needs
no websocket package and no network. Needs Debian's `chromium` (scripts/test.sh installs it when missing).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe")  # fmt: skip
IMAGES_JS = "JSON.stringify(Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth]))"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium driven over the DevTools pipe: send(method, params) -> result; events are kept."""

    def __init__(self, binary: str, profile: str, timeout: float = 60.0) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_pipes() -> None:  # in the child: the protocol's fd 3 (commands in) and fd 4 (replies out)
            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(  # noqa: S603 - a fixed binary and fixed flags
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire_pipes,
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        self.timeout, self.events, self._buffer, self._next_id = timeout, [], b"", 0

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            os.close(fd)


def _errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads (a broken image is a Log entry)."""
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            out.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}".strip())
    return out


def check_page(
    page: str | Path, screenshot: str | Path | None = None, width: int = 1280, height: int = 1600,
    scroll_to: str | None = None,
) -> dict:
    """Load `page` from disk; return {"images": [(alt, complete, naturalWidth)], "errors": [...], "title": str}.

    `screenshot`: a PNG of the `width` x `height` viewport, at the top or scrolled to the element id `scroll_to`.
    """
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="fsad-chromium-") as profile:
        browser = Chromium(binary, profile)
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                browser.send(f"{domain}.enable", session=session)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
            browser.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session)
            browser.wait_event("Page.loadEventFired")
            value = browser.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True}, session)
            title = browser.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, session)
            if scroll_to:
                js = f"document.getElementById({json.dumps(scroll_to)}).scrollIntoView()"
                browser.send("Runtime.evaluate", {"expression": js}, session)
            if screenshot:
                shot = browser.send("Page.captureScreenshot", {"format": "png"}, session)
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            time.sleep(0.2)  # late console messages
            browser.send("Runtime.evaluate", {"expression": "1"}, session)  # drain events queued meanwhile
        finally:
            browser.close()
    return {"images": [tuple(i) for i in json.loads(value["result"]["value"])], "errors": _errors(browser.events),
            "title": title["result"]["value"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--height", type=int, default=1600, help="viewport height of the screenshot (px)")
    parser.add_argument("--scroll-to", help="element id to scroll to before the screenshot")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"error: no such page {args.page}", file=sys.stderr)
        return 2
    result = check_page(args.page, args.screenshot, height=args.height, scroll_to=args.scroll_to)
    broken = [alt for alt, complete, width in result["images"] if not complete or width == 0]
    print(f"{result['title']}: {len(result['images'])} images, {len(broken)} broken, {len(result['errors'])} errors")
    for line in broken + result["errors"]:
        print(f"  {line}")
    return 1 if broken or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
