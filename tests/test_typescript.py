"""The TypeScript client and examples/node-app, through `make ts-test`.

That target installs the npm packages the lockfiles pin (once), builds the
client, its tests and the example, and runs node's test runner against real
server processes (clients/typescript/test/). This module is how `make test`
and CI run them; it skips, with one line, on a machine without node and npm.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300.0


def test_typescript_client_and_example() -> None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: the TypeScript client is not tested")
    # Our own make, not the one `make test` runs in: its jobserver and flags
    # are not for this one.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["CRUZFLOW_BIN"] = str(Path(sys.executable).with_name("cruzflow"))
    try:
        run = subprocess.run(
            ["make", "--no-print-directory", "ts-test"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        pytest.fail(f"make ts-test did not finish within {TIMEOUT:g} s:\n{output}")
    assert run.returncode == 0, f"make ts-test failed ({run.returncode}):\n{run.stdout}"
    # node's summary, last: "# tests 56", "# pass 56", "# skipped 0", ...
    summary = dict(re.findall(r"^# (tests|pass|fail|cancelled|skipped) (\d+)$", run.stdout, re.M))
    assert int(summary.get("tests", "0")) > 0, run.stdout
    assert summary.get("pass") == summary.get("tests"), run.stdout
    # Every test runs over both transports: a skip would hide one untested.
    assert summary.get("skipped") == "0", f"node skipped tests:\n{run.stdout}"
