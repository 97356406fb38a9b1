"""Running a peer daemon so that it never outlives the test that started it.

Each daemon gets its own session (process group), so stopping it also reaps helpers it spawned
(containerd-shim, for instance). Its output goes to a log file rather than a pipe: a pipe nobody
reads fills up and stalls the daemon, and the file's tail is what makes a startup failure readable.
"""
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

COMMAND_TIMEOUT = 90.0


class PeerError(RuntimeError):
    """A peer program failed; the message carries what it printed."""


class Daemon:
    """A started peer process with its log file."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = os.path.basename(str(argv[0]))
        self.log_path = log_path
        self._stopped = False
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(arg) for arg in argv], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's output, for error messages."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        """Poll ``ready`` until it holds; stop the daemon and raise if it dies or takes too long."""
        deadline = time.monotonic() + timeout
        while not ready():
            status = self.process.poll()
            if status is not None or time.monotonic() > deadline:
                self.stop()
                what = f"exited with status {status}" if status is not None else \
                    f"was not ready after {timeout:.0f}s"
                raise PeerError(f"{self.name} {what}; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate the whole process group, then kill it if it lingers. Safe to call twice."""
        if self._stopped:
            return  # the group id may belong to someone else by now
        self._stopped = True
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Helpers in the group may survive their parent's clean exit; SIGKILL whatever is left.
        self._signal(signal.SIGKILL)
        self.process.wait()

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


def run(argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT, input: bytes | None = None) -> bytes:
    """Run a peer command line to completion and return its stdout; raise with its stderr.

    ``input`` is written to its stdin (a secret such as ``--password-stdin`` wants, which must not
    appear on a command line); without it stdin is empty, so a prompting client fails at once.

    The timeout is short because every client run here talks to loopback servers: a client that
    waits longer is hung on a server that never answers, and the test should say so promptly.
    """
    command = [str(arg) for arg in argv]
    try:
        result = subprocess.run(command, env=env, capture_output=True, timeout=timeout,
                                input=input if input is not None else b"")
    except subprocess.TimeoutExpired as expired:
        raise PeerError(f"{' '.join(command)} still running after {timeout:.0f}s:\n"
                        f"{(expired.stderr or b'').decode(errors='replace').strip()}") from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).decode(errors="replace")
        raise PeerError(f"{' '.join(command)} exited with {result.returncode}:\n{output}")
    return result.stdout
