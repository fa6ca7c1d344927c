"""A function version — what an execution environment is built for — and the environment
variables Lambda's runtimes expect (FAAS-REFERENCE.md §1)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

RUNTIMES = ("python3.11", "provided", "http")
# awslambdaric's handler names module.function (module may be a package path a/b.c)
PY_HANDLER_RE = re.compile(r"[A-Za-z_][\w/.-]*\.[A-Za-z_]\w*")
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# variables Lambda reserves: a function may not set them (its own values would lie)
RESERVED_ENV = frozenset(
    {
        "_HANDLER", "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
        "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_EXECUTION_ENV",
        "AWS_REGION", "AWS_DEFAULT_REGION", "PORT",
    }
)  # fmt: skip
ENV_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MAX_ENV_BYTES = 4096  # Lambda's limit on a function's variables, all together


class FunctionError(ValueError):
    """A function definition refused; the message names the field."""


def _runtime_ok(runtime: str) -> bool:
    return runtime in RUNTIMES or re.fullmatch(r"python3\.\d{1,2}", runtime) is not None


@dataclass(frozen=True)
class FunctionVersion:
    tenant: str
    name: str
    version: str
    digest: str  # the code's content address (CodeStore)
    runtime: str
    handler: str
    timeout: float
    cls: str  # the function's class: an invocation's effective class may differ
    memory_mb: int = 128  # recorded and shown to the handler, never a limit
    env: tuple[tuple[str, str], ...] = field(default=())
    region: str = "xx-local-1"

    def __post_init__(self):
        for what in ("tenant", "name"):
            if not NAME_RE.fullmatch(getattr(self, what)):
                raise FunctionError(f"{what}: 1-64 of [A-Za-z0-9_-], got {getattr(self, what)!r}")
        if not _runtime_ok(self.runtime):
            raise FunctionError(f"runtime: one of python3.x, provided, http; got {self.runtime!r}")
        if self.runtime.startswith("python") and not PY_HANDLER_RE.fullmatch(self.handler):
            raise FunctionError(
                f"handler: module.function for {self.runtime}, got {self.handler!r}"
            )
        if len(self.handler) > 512 or "\0" in self.handler:
            raise FunctionError("handler: at most 512 characters, no NUL")
        if not 0 < self.timeout <= 900:
            raise FunctionError(f"timeout: seconds in (0, 900], got {self.timeout}")
        size = 0
        for k, v in self.env:
            if not ENV_NAME_RE.fullmatch(k) or k in RESERVED_ENV:
                raise FunctionError(f"environment: {k!r} is not a name a function may set")
            size += len(k) + len(v)
        if size > MAX_ENV_BYTES:
            raise FunctionError(f"environment: {size} bytes, the limit is {MAX_ENV_BYTES}")

    @property
    def key(self) -> str:
        """Environments are reused only for the same code and the same configuration."""
        h = hashlib.sha256(repr((self.runtime, self.handler, self.env, self.memory_mb)).encode())
        return f"{self.tenant}/{self.name}:{self.version}@{self.digest[-12:]}.{h.hexdigest()[:8]}"

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{self.tenant}:function:{self.name}"

    @property
    def python(self) -> bool:
        return self.runtime.startswith("python")

    def environ(
        self, runtime_api: str, env_id: str, port: int | None, lambda_url: str = ""
    ) -> dict[str, str]:
        """What a runtime finds in its environment (Lambda's names; PORT for http). With
        ``lambda_url`` (the node's Lambda proxy) an unmodified SDK calls other functions
        through the node, which vouches for the caller's class (node/env/lambda_proxy.py);
        the credentials only satisfy the SDK's signer, and like Lambda's reserved names
        the function's own variables cannot replace them."""
        e = {
            "PATH": "/var/lang/bin:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            "HOME": "/tmp",
            "PYTHONUNBUFFERED": "1",  # a handler's prints reach its invocation's log in order
            "_HANDLER": self.handler,
            "LAMBDA_TASK_ROOT": "/var/task",
            "LAMBDA_RUNTIME_DIR": "/var/runtime",
            "AWS_LAMBDA_RUNTIME_API": runtime_api,
            "AWS_LAMBDA_FUNCTION_NAME": self.name,
            "AWS_LAMBDA_FUNCTION_VERSION": self.version,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"{self.tenant}/{env_id}",
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{self.runtime}",
        }
        if port is not None:
            e["PORT"] = str(port)
        if lambda_url:
            e["AWS_ENDPOINT_URL_LAMBDA"] = lambda_url
        e.update(self.env)
        if lambda_url:
            e |= {
                "AWS_ACCESS_KEY_ID": "XXENV" + "".join(c for c in env_id if c.isalnum()).upper(),
                "AWS_SECRET_ACCESS_KEY": "vouched-for-by-the-node-not-by-this-secret",
            }
            e.pop("AWS_SESSION_TOKEN", None)
        return e
