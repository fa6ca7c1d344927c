"""A whole XX on this machine for a test: `xxctl up` in a state dir of the test's own, its
endpoint and credentials, boto3 clients for its tenants, the real AWS CLI, and a function's
code as CreateFunction takes it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import boto3
from botocore.config import Config

from xxnode.node import usage as usage_outbox

XXCTL = str(Path(sys.executable).with_name("xxctl"))
AWS = str(Path(sys.executable).with_name("aws"))
REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/lambda-role"  # stored and echoed back, never assumed


def zipped(files: dict[str, str]) -> bytes:
    """A deployment package: {name: source}, each dedented (the tests write them indented)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, textwrap.dedent(text))
    return buf.getvalue()


class Up:
    def __init__(self, state: Path, args: tuple[str, ...] = ()):
        self.state = state
        self.args = list(args)  # more `xxctl up` options (e.g. --metrics HOST:PORT)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.credentials = Path()

    def start(self) -> Up:
        self.proc = subprocess.Popen(
            [XXCTL, "up", "--state-dir", str(self.state), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        first, second = self.proc.stdout.readline(), self.proc.stdout.readline()
        if not first.startswith("endpoint: "):
            self.proc.kill()
            raise AssertionError(f"xxctl up did not start: {first!r} {self.proc.stderr.read()}")
        self.endpoint = first.split()[1]
        self.credentials = Path(second.split()[1])
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()

    @property
    def store(self) -> str:
        return f"sqlite:///{self.state / 'gateway.db'}"

    def keys(self) -> tuple[str, str]:
        text = self.credentials.read_text()
        kv = dict(
            (k.strip(), v.strip())
            for k, _, v in (ln.partition("=") for ln in text.splitlines())
            if v
        )
        return kv["aws_access_key_id"], kv["aws_secret_access_key"]

    def tenant(self, name: str, default_class: str | None = None) -> tuple[str, str]:
        argv = [XXCTL, "tenant", "create", name, "--store", self.store, "--json"]
        if default_class:
            argv += ["--default-class", default_class]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        return out["access_key_id"], out["secret_access_key"]

    def client(self, keys: tuple[str, str] | None = None, retries: int = 0):
        akid, secret = keys or self.keys()
        return boto3.client(
            "lambda", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=akid, aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": retries + 1, "mode": "standard"},
                          read_timeout=120, connect_timeout=10),
        )  # fmt: skip

    def aws(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, "AWS_SHARED_CREDENTIALS_FILE": str(self.credentials),
               "AWS_CONFIG_FILE": os.devnull, "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
        env.pop("AWS_ACCESS_KEY_ID", None)
        env.pop("AWS_SECRET_ACCESS_KEY", None)
        return subprocess.run(
            [AWS, "--endpoint-url", self.endpoint, "--region", REGION, "--output", "json",
             "lambda", *args],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip


def node_metered(state: Path, timeout: float = 60) -> dict[str, dict]:
    """What `xxctl up`'s node metered, once its outbox has sent everything (nothing
    announces that outside the node: its file is read again until it says so)."""
    deadline = time.monotonic() + timeout
    while True:
        unsent, records = usage_outbox.read(state / "node" / "usage.db")
        if unsent == 0:
            return records
        assert time.monotonic() < deadline, f"{unsent} usage records never reached the ledger"
        time.sleep(0.05)
