"""A cluster job's spec is checked at the first hop; each refusal names its field."""

from __future__ import annotations

import pytest

from xxnode.cluster.spec import spec_error


@pytest.mark.parametrize(
    "spec",
    [
        {"argv": ["true"]},
        {"argv": ["/bin/sh", "-c", "echo hi"], "env": {"A_1": "x"}, "cwd": "/tmp", "timeout": 2},
        {"sleep": 0},
        {"spin": 0.5},
        {"function": {"code": "/srv/fn", "runtime": "python3.11", "handler": "app.h"}},
        {
            "function": {"code": "/srv/fn.zip", "runtime": "provided"},
            "env": {"A": "b"},
            "timeout": 3,
        },
        {
            "function": {
                "digest": "sha256:" + "a" * 64,
                "code_url": "http://127.0.0.1:9000",
                "runtime": "python3.12",
                "handler": "app.h",
                "tenant": "t1",
            }
        },
    ],
)
def test_specs_a_node_can_run_pass(spec):
    assert spec_error(spec) is None


@pytest.mark.parametrize(
    "spec, words",
    [
        ({}, "spec.argv: a command (or a function) is required"),
        ({"argv": []}, "spec.argv: a command (or a function) is required"),
        ({"argv": [""]}, "spec.argv: the command is empty"),
        ({"argv": "ls -l"}, "spec.argv: Expected `array`, got `str`"),
        ({"argv": ["a\x00b"]}, "spec.argv[0]: must not contain a NUL byte"),
        ({"argv": ["x"], "timeout": 0}, "spec.timeout: Expected `float` > 0.0"),
        ({"argv": ["x"], "timeout": "1"}, "spec.timeout: Expected `float | null`, got `str`"),
        ({"argv": ["x"], "cwd": "tmp"}, "spec.cwd: must be an absolute path"),
        ({"argv": ["x"], "env": {"1A": "b"}}, "spec.env (a name): must be a variable name"),
        ({"argv": ["x"], "env": {"A": 1}}, "spec.env[...]: Expected `str`, got `int`"),
        ({"argv": ["x"], "argz": 1}, "spec.argz: unknown field (known: argv, function, env, cwd"),
        (["true"], "spec: Expected `object`, got `array`"),
        (
            {"function": {"code": "fn", "runtime": "provided"}},
            "spec.function.code: must be an absolute path",
        ),
        ({"function": {"code": "/fn"}}, "spec.function.runtime: required"),
        ({"function": {"runtime": "provided"}}, "spec.function: give its code by path or by"),
        (
            {"function": {"code": "/fn", "digest": "sha256:" + "0" * 64, "runtime": "provided"}},
            "spec.function: give its code by path or by digest",
        ),
        (
            {"function": {"digest": "sha256:" + "0" * 64, "runtime": "provided"}},
            "spec.function.code_url: code by digest needs the store",
        ),
        (
            {"function": {"digest": "md5:0", "runtime": "provided", "code_url": "http://g"}},
            "spec.function.digest: must be sha256:<64 hex digits>",
        ),
        (
            {"function": {"digest": "sha256:" + "0" * 64, "runtime": "provided", "code_url": "g"}},
            "spec.function.code_url: must be an http(s) URL",
        ),
        (
            {"function": {"code": "/fn", "runtime": "provided", "cmd": "x"}},
            "spec.function.cmd: unknown field (known: code, digest, code_url, runtime",
        ),
        (
            {"function": {"code": "/fn", "runtime": "provided"}, "argv": ["x"]},
            "spec.function: an invocation takes no argv",
        ),
        (
            {"function": {"code": "/fn", "runtime": "provided", "memory_mb": 1}},
            "spec.function.memory_mb: Expected `int` >= 128",
        ),
    ],
)
def test_a_bad_spec_is_refused_naming_its_field(spec, words):
    assert (spec_error(spec) or "").startswith(words), spec_error(spec)
