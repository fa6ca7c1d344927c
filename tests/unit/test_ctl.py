"""xxctl argument handling and output formats, without a daemon or a shard."""

from __future__ import annotations

import argparse

import pytest

from xxnode.cli import version
from xxnode.ctl import cluster_cmds, doctor, main, node_cmds
from xxnode.node import main as node_main
from xxnode.shard import main as shard_main


@pytest.mark.parametrize(
    "prog, parse",
    [
        ("xxctl", lambda a: main.build_parser().parse_args(a)),
        ("xxnode", node_main.main),
        ("xxshard", shard_main.main),
    ],
)
def test_every_command_says_its_version(prog, parse, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {version()}" and version() != "unknown"


def test_xxshard_help_describes_it_whole_and_every_option(capsys):
    with pytest.raises(SystemExit):
        shard_main.main(["--help"])
    out = capsys.readouterr().out
    assert "SIGTERM" in out  # the description's last paragraph, not its first line only
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  -")]
    assert "--config" in options and "--key-file" in options and "--log-level" in options
    for line in out.splitlines():
        if line.startswith("  --") and line.split()[0] not in ("--log-level",):
            # each option line carries its help text (or it wraps onto the next line)
            assert len(line.split()) > 2 or line.strip().endswith(("FILE", "DIR", "PORT")), line


def test_the_dead_usage_error_class_is_gone():
    assert not hasattr(main, "UsageError")


@pytest.mark.parametrize("bad", ["-1", "0", "x"])
def test_jobs_refuses_limits_below_one(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main.build_parser().parse_args(["jobs", "--limit", bad])
    assert e.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_jobs_limit_one_is_accepted():
    assert main.build_parser().parse_args(["jobs", "--limit", "1"]).limit == 1


def test_unknown_class_names_the_known_ones():
    with pytest.raises(node_cmds._Refused) as e:
        node_cmds._check_class("nosuch", [{"name": "high"}, {"name": "low"}])
    assert "'nosuch'" in str(e.value) and "high, low" in str(e.value)
    node_cmds._check_class("low", [{"name": "high"}, {"name": "low"}])  # no error


def test_interrupt_note_says_how_to_kill_the_job():
    note = node_cmds._interrupted_note("j42")
    assert "still running" in note and "xxctl kill j42" in note


def test_empty_shard_lists_say_so():
    assert cluster_cmds._head({"addr": "a:1", "nodes": []}, "nodes", "no nodes listed") == (
        "a:1: no nodes listed"
    )
    assert cluster_cmds._head({"addr": "a:1", "error": "timeout"}, "nodes", "x") == "a:1: timeout"
    assert cluster_cmds._head({"addr": "a:1", "nodes": [{}]}, "nodes", "x") == "a:1: 1 listed"


def test_missing_cluster_key_is_a_clear_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XX_CLUSTER_KEY_FILE", raising=False)
    key = tmp_path / "none.key"
    args = argparse.Namespace(shard="127.0.0.1:1", key_file=str(key), command="shards")
    assert cluster_cmds._guard(cluster_cmds.cmd_shards, args) == 2
    err = capsys.readouterr().err
    assert f"no cluster key at {key}; pass --key-file" in err and "Errno" not in err


def test_help_names_the_default_key(capsys):
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["shards", "--help"])
    assert "/etc/xx/cluster.key" in capsys.readouterr().out


def test_doctor_names_controllers_offered_but_not_delegated():
    note = doctor.delegation_note({"cpu", "memory", "hugetlb"}, {"cpu", "memory"})
    assert note is not None and note.endswith(": hugetlb")
    assert doctor.delegation_note({"cpu"}, {"cpu"}) is None


def test_broken_pipe_in_a_handler_exits_quietly(monkeypatch, capsys):
    def boom(args):
        raise BrokenPipeError(32, "Broken pipe")

    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(command="jobs", func=boom)

    monkeypatch.setattr(main, "build_parser", Parser)
    monkeypatch.setattr(main, "_quiet_broken_pipe", lambda: 141)  # keep pytest's stdout
    assert main.main(["jobs"]) == 141
    assert capsys.readouterr().err == ""


def test_jobs_with_an_unknown_class_exits_2_listing_the_daemons_classes(monkeypatch, capsys):
    sent = []

    class FakeClient:
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def call(self, req):
            sent.append(req["op"])
            if req["op"] == "classes":
                return {"ok": True, "classes": [{"name": "high"}, {"name": "batch"}]}
            return {"ok": True, "jobs": []}

    monkeypatch.setattr(node_cmds, "Client", FakeClient)
    args = main.build_parser().parse_args(["jobs", "--class", "nosuch"])
    assert args.func(args) == 2
    assert sent == ["classes"]  # the jobs request was never sent
    err = capsys.readouterr().err
    assert err == "xxctl jobs: unknown class 'nosuch' (known: high, batch)\n"


def test_job_and_cancel_refuse_what_is_not_a_job_id(capsys, tmp_path, monkeypatch):
    key = tmp_path / "k"
    key.write_text("00" * 32)
    for cmd in ("job", "cancel"):
        code = main.main([cmd, "--shard", "127.0.0.1:9", "--key-file", str(key), "xyz"])
        assert code == 2
        assert "'xyz' is not a job id (32 hex digits" in capsys.readouterr().err
