"""
A real S3-compatible HTTP server on 127.0.0.1 for the tests: moto in server mode.

It runs as a child process, is reached through s3fs like any S3 endpoint, and is
stopped by its PID. Used by ``conftest.py`` and by the benchmarks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

# Credentials moto accepts; nothing here reaches a real account.
KEY = "testing"
SECRET = "testing"
# moto needs a few seconds to import on a loaded 2-core machine.
_START_SECONDS = 60.0


class S3Server:
    """A moto server child process on a free loopback port."""

    def __init__(self) -> None:
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop)
            prefix="moto-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        self.endpoint = self._wait_for_endpoint()

    @property
    def options(self) -> dict[str, Any]:
        """Storage options that point s3fs at this server."""
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET}

    def environment(self) -> dict[str, str]:
        """Environment variables that point s3fs in a child process at this server."""
        return {
            "FSSPEC_S3": json.dumps(self.options),
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        """Stop the server by its PID and remove its log."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        os.unlink(self._log.name)

    def _wait_for_endpoint(self) -> str:
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with open(self._log.name) as log:
                found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read())
            if found and _answers(found.group(1)):
                return found.group(1)
            time.sleep(0.1)
        with open(self._log.name) as log:
            output = log.read()
        self.stop()
        msg = f"the moto S3 server did not start: {output[-2000:]}"
        raise RuntimeError(msg)


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2):
            return True
    except OSError as err:
        # Any HTTP answer, even an error, means the server is up.
        return hasattr(err, "code")
