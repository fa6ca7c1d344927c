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
    ],
)
def test_specs_a_node_can_run_pass(spec):
    assert spec_error(spec) is None


@pytest.mark.parametrize(
    "spec, words",
    [
        ({}, "spec.argv: a command is required"),
        ({"argv": []}, "spec.argv: a command is required"),
        ({"argv": [""]}, "spec.argv: the command is empty"),
        ({"argv": "ls -l"}, "spec.argv: Expected `array`, got `str`"),
        ({"argv": ["a\x00b"]}, "spec.argv[0]: must not contain a NUL byte"),
        ({"argv": ["x"], "timeout": 0}, "spec.timeout: Expected `float` > 0.0"),
        ({"argv": ["x"], "timeout": "1"}, "spec.timeout: Expected `float | null`, got `str`"),
        ({"argv": ["x"], "cwd": "tmp"}, "spec.cwd: must be an absolute path"),
        ({"argv": ["x"], "env": {"1A": "b"}}, "spec.env (a name): must be a variable name"),
        ({"argv": ["x"], "env": {"A": 1}}, "spec.env[...]: Expected `str`, got `int`"),
        ({"argv": ["x"], "argz": 1}, "spec.argz: unknown field (known: argv, env, cwd"),
        (["true"], "spec: Expected `object`, got `array`"),
    ],
)
def test_a_bad_spec_is_refused_naming_its_field(spec, words):
    assert (spec_error(spec) or "").startswith(words), spec_error(spec)
