"""A real browser for the web-app tests: Playwright (Python) driving the system's Chromium (Debian's
``/usr/bin/chromium``; no browser download), plus small helpers for servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import urllib.request

import pytest

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path():
    for p in (os.environ.get("REALISR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if p and os.path.isfile(p):
            return p
    return None


@contextlib.contextmanager
def browser():
    """A headless Chromium (skips when Playwright or Chromium is missing; CI installs both)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (Python package only)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc=None) -> None:
    """Poll ``url`` until it answers (bounded); fail early when ``proc`` died."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status < 500:
                    return
        except OSError as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s ({last})")


def wait_until(cond, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s")
