"""The log formats: JSON lines, the journal's native encoding, what a call site attaches."""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import uuid

import pytest

from xxnode import logs


def record(msg="job %s done", args=("j1",), level=logging.INFO, xx=None, exc=None):
    r = logging.LogRecord("xxnode", level, "/x/daemon.py", 42, msg, args, exc, func="finish")
    r.created, r.msecs = 1764800000.5, 500.0
    if xx is not None:
        r.xx = xx
    return r


def test_json_is_one_object_a_line_with_the_fields_of_about():
    extra = logs.about(invocation="inv-1", job="j1", cls="high", tenant="t", node=None)
    line = logs.JsonFormatter("xxnode").format(record(xx=extra["xx"]))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc == {
        "ts": "2025-12-03T22:13:20.500Z", "level": "info", "prog": "xxnode", "logger": "xxnode",
        "msg": "job j1 done", "invocation": "inv-1", "job": "j1", "class": "high", "tenant": "t",
    }  # fmt: skip


def test_json_keeps_a_traceback_in_one_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc = sys.exc_info()
    doc = json.loads(logs.JsonFormatter("xxgate").format(record(level=logging.ERROR, exc=exc)))
    assert doc["level"] == "error" and "ValueError: boom\nsecond line" in doc["exc"]


def test_the_standard_fields_cannot_be_overwritten_by_about():
    with pytest.raises(TypeError, match="unknown field 'msg'"):
        logs.about(msg="x")


def test_native_encoding_plain_and_binary_fields():
    out = logs.encode_fields([("MESSAGE", "hello"), ("XX_CLASS", "high"), ("MESSAGE2", "a\nb")])
    assert out == (b"MESSAGE=hello\nXX_CLASS=high\nMESSAGE2\n" + struct.pack("<Q", 3) + b"a\nb\n")


def test_native_encoding_counts_bytes_not_characters():
    out = logs.encode_fields([("MESSAGE", "µ\n")])
    assert out == b"MESSAGE\n" + struct.pack("<Q", 3) + "µ\n".encode() + b"\n"


def test_journal_fields_priority_identifier_and_xx_fields():
    r = record(level=logging.WARNING, xx=logs.about(invocation="i", cls="low", tenant="t")["xx"])
    f = dict(logs.journal_fields(r, "xxshard", "job j1 done"))
    assert f["MESSAGE"] == "job j1 done" and f["PRIORITY"] == "4"
    assert f["SYSLOG_IDENTIFIER"] == "xxshard" and f["CODE_LINE"] == "42"
    assert f["CODE_FUNC"] == "finish"
    assert (f["XX_INVOCATION"], f["XX_CLASS"], f["XX_TENANT"]) == ("i", "low", "t")
    levels = {lv: dict(logs.journal_fields(record(level=lv), "p", "m"))["PRIORITY"]
              for lv in (logging.DEBUG, logging.INFO, logging.ERROR, logging.CRITICAL)}  # fmt: skip
    assert levels == {logging.DEBUG: "7", logging.INFO: "6", logging.ERROR: "3",
                      logging.CRITICAL: "2"}  # fmt: skip


def test_a_cluster_job_id_is_logged_as_the_uuid_the_gateway_answered():
    u = uuid.uuid4()
    assert logs.invocation_id(u.bytes) == str(u)
    assert logs.invocation_id(b"\x01\x02") == "0102"


def test_stderr_is_the_journal_only_when_its_device_and_inode_match():
    st = os.fstat(sys.stderr.fileno())
    assert logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not logs.stderr_is_journal({"JOURNAL_STREAM": "garbage"})
    assert not logs.stderr_is_journal({})


def test_handler_for_picks_the_format_and_the_target(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    h = logs.handler_for("xxnode", "json", "stderr")
    assert isinstance(h, logging.StreamHandler) and isinstance(h.formatter, logs.JsonFormatter)
    h = logs.handler_for("xxnode", "text", "auto")  # not under systemd: stderr, stamped
    assert isinstance(h.formatter, logs.TextFormatter)
    assert h.formatter.format(record()).startswith("2025-12-03T22:13:20.500Z xxnode INFO")
    j = logs.handler_for("xxnode", "text", "journal")
    try:
        assert isinstance(j, logs.JournalHandler) and j.path == logs.JOURNAL_SOCKET
    finally:
        j.close()
