"""One invocation: what the caller asked, what the environment answered, what it cost, and
its log with Lambda's START / END / REPORT lines."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from xxnode.node.env.function import FunctionVersion

GB = 1 << 30


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Invocation:
    fn: FunctionVersion
    payload: bytes
    cls: str  # the effective class of this invocation (may differ from the function's)
    timeout: float
    cpu_price: float  # µ¢ per CPU-second of the effective class, in force at acceptance
    memory_price: float  # µ¢ per GB-second, the same in every class
    log_limit: int = 1 << 20
    request_id: str = field(default_factory=new_request_id)
    accepted: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    caller: dict | None = None  # its chain: {payer, depth, own_class, ...}, from the gateway
    # set as it runs
    env_id: str = ""
    cold: bool = False
    init_ms: float = 0.0
    started: float = 0.0  # monotonic at hand-over
    deadline_ms: int = 0  # epoch ms, as Lambda-Runtime-Deadline-Ms
    cpu_us: int = 0
    memory_source: str = ""
    max_memory: int = 0
    mean_memory: int = 0
    log: bytearray = field(default_factory=bytearray)
    log_dropped: int = 0

    def add_log(self, data: bytes) -> None:
        room = self.log_limit - len(self.log)
        if room > 0:
            self.log += data[:room]
        self.log_dropped += max(0, len(data) - max(room, 0))

    def finish(self, response: bytes | None, content_type: str, error: dict | None) -> dict:
        """The result and its usage record; resolves the caller's future once."""
        duration_ms = (time.monotonic() - self.started) * 1000 if self.started else 0.0
        billed_ms = max(1, math.ceil(duration_ms))
        cpu_s = self.cpu_us / 1e6
        gb_s = self.mean_memory / GB * billed_ms / 1000
        report = {
            "request_id": self.request_id,
            "function": self.fn.name,
            "version": self.fn.version,
            "tenant": self.fn.tenant,
            "env": self.env_id,
            "class": self.cls,
            "cold": self.cold,
            "init_ms": round(self.init_ms, 3),
            "queued_ms": round(((self.started or self.accepted) - self.accepted) * 1000, 3),
            "duration_ms": round(duration_ms, 3),
            "billed_ms": billed_ms,
            "cpu_ms": round(self.cpu_us / 1000, 3),
            "max_memory_mb": math.ceil(self.max_memory / (1 << 20)),
            "gb_s": round(gb_s, 9),
            "memory_source": self.memory_source,
            "price": round(cpu_s * self.cpu_price + gb_s * self.memory_price, 9),
            "cpu_price": self.cpu_price,
            "memory_price": self.memory_price,
            "log_dropped": self.log_dropped,
        }
        self.log += self.end_lines(report, error)  # always kept, past the limit
        result = {
            "response": _decode(response, content_type) if error is None else None,
            "content_type": content_type,
            "error": error,
            "report": report,
            "log": self.log.decode("utf-8", "replace"),
        }
        if self.future is not None and not self.future.done():
            self.future.set_result(result)
        return result

    def start_line(self) -> bytes:
        return f"START RequestId: {self.request_id} Version: {self.fn.version}\n".encode()

    def end_lines(self, r: dict, error: dict | None) -> bytes:
        init = f"\tInit Duration: {r['init_ms']:.2f} ms" if r["cold"] else ""
        status = f"\tStatus: error\tError Type: {error.get('errorType', '')}" if error else ""
        dropped = f"\n[{self.log_dropped} bytes of log dropped]" if self.log_dropped else ""
        return (
            f"{dropped}\nEND RequestId: {self.request_id}\n"
            f"REPORT RequestId: {self.request_id}\tDuration: {r['duration_ms']:.2f} ms\t"
            f"Billed Duration: {r['billed_ms']} ms\tMemory Size: {self.fn.memory_mb} MB\t"
            f"Max Memory Used: {r['max_memory_mb']} MB{init}\tClass: {self.cls}\t"
            f"CPU: {r['cpu_ms']:.2f} ms{status}\n"
        ).encode()


def _decode(body: bytes | None, content_type: str):
    """JSON responses as values; anything else as text, or base64 if it is not UTF-8."""
    if body is None:
        return None
    if content_type.startswith("application/json") or not content_type:
        try:
            return json.loads(body)
        except ValueError:
            pass
    try:
        return body.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(body).decode()}


def error_doc(body: bytes, error_type: str) -> dict:
    """An /error or /init/error body as the caller sees it (Lambda's shape), whatever the
    runtime sent."""
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    out = {
        "errorType": str(doc.get("errorType") or error_type or "Unhandled")[:256],
        "errorMessage": str(doc.get("errorMessage", body[:4096].decode("utf-8", "replace"))),
    }
    if isinstance(doc.get("stackTrace"), list):
        out["stackTrace"] = [str(x) for x in doc["stackTrace"][:100]]
    return out
