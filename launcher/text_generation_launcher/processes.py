"""Child processes of the launcher: started in their own session, their output re-logged, stopped in order."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from loguru import logger

TAIL_LINES = 40  # output lines kept per child, shown when it fails


class Child:
    """One child process whose stdout/stderr lines are re-logged under `name` and kept in a short tail."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.logged_error = False  # whether the child itself logged an ERROR line (relayed as is)
        # own session: a Ctrl-C in the terminal reaches the launcher only, which then stops children in order
        self.process = subprocess.Popen(
            self.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._relay, name=f"relay-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def _relay(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if not line:
                continue
            message, level = parse_log_line(line)
            self.tail.append(message)
            self.logged_error = self.logged_error or level in ("ERROR", "CRITICAL")
            logger.opt(depth=0).log(level, f"[{self.name}] {message}")

    def last_error(self) -> str:
        """The most telling line of the tail: the last one that looks like an error, else the last one."""
        for line in reversed(self.tail):
            if any(word in line for word in ("ERROR", "Error", "error:", "Traceback", "refused")):
                return line
        return self.tail[-1] if self.tail else "(no output)"

    def signal_stop(self) -> None:
        """SIGTERM to the child, if it still runs."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> int | None:
        """Wait for the child until `deadline` (time.monotonic()), then SIGKILL its whole session; its exit code."""
        try:
            self.process.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            logger.warning(f"{self.name} did not stop in time; killing it")
        # children of the child (e.g. ranks' helpers) die with its session
        _signal_group(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            logger.error(f"{self.name} (pid {self.process.pid}) survived SIGKILL")
        self._reader.join(timeout=2)
        return self.process.returncode


def terminate_all(children: Sequence[Child], grace_s: float) -> None:
    """SIGTERM every child at once, then give them `grace_s` together before SIGKILL. At once, because ranks
    of one model stop together: a rank waited for alone may wait on its peers."""
    for child in children:
        child.signal_stop()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.wait_or_kill(deadline)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# a loguru line as the children print it: "2026-01-01 10:00:00.000 | ERROR    | module:function:12 - message"
_LOGURU_LINE = re.compile(r"^\S+ \S+ \| (?P<level>[A-Z]+)\s*\| \S+ - (?P<message>.*)$")


def parse_log_line(line: str) -> tuple[str, str]:
    """A child's log line (loguru text, or a JSON record with `--json-output`) -> (message, level name)."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return line, "INFO"
        if isinstance(record, dict) and isinstance(record.get("record"), dict):
            inner = record["record"]
            return inner.get("message", line).rstrip(), inner.get("level", {}).get("name", "INFO")
        return line, "INFO"
    match = _LOGURU_LINE.match(line)
    if match:
        return match["message"], match["level"]
    return line, "INFO"


def wait_until(condition, timeout_s: float, children: Sequence[Child], what: str, every_s: float = 10.0) -> None:
    """Poll `condition` until true; raise if a child exits first or the time runs out (with progress logs)."""
    start = time.monotonic()
    next_report = start + every_s
    while not condition():
        for child in children:
            code = child.poll()
            if code is not None:
                raise ChildFailed(child, f"{child.name} exited with code {code} while {what}: {child.last_error()}")
        now = time.monotonic()
        if now - start > timeout_s:
            raise TimeoutError(f"gave up after {timeout_s:.0f}s {what}")
        if now >= next_report:
            logger.info(f"still {what} ({now - start:.0f}s)")
            next_report += every_s
        time.sleep(0.1)


class ChildFailed(RuntimeError):
    def __init__(self, child: Child, message: str):
        super().__init__(message)
        self.child = child
