"""One mapping from a job's end to words and exit status, whichever path reported it."""

import pytest

from xxnode import outcome, wire

TIMEOUT = {"state": "timeout", "reason": "timed out after 1 s", "exit_code": None, "signal": 9}


@pytest.mark.parametrize(
    ("res", "status", "said"),
    [
        ({"state": "succeeded", "reason": "", "exit_code": 0, "signal": None}, 0, "succeeded"),
        (TIMEOUT, 124, "timed out after 1 s"),
        # the same end through the cluster: the node's record with the cluster's status
        ({**TIMEOUT, "status": 137}, 124, "timed out after 1 s"),
        ({"state": "failed", "reason": "exit code 3", "exit_code": 3, "signal": None}, 3,
         "failed: exit code 3"),
        ({"state": "failed", "reason": "killed by SIGTERM", "exit_code": None, "signal": 15},
         143, "failed: killed by SIGTERM"),
        ({"state": "start_failed", "reason": "exec: No such file or directory"}, 127,
         "start_failed: exec: No such file or directory"),
        ({"status": wire.NODE_LOST, "error": "node lost"}, 1,
         "the node running it was lost (node lost)"),
        ({"status": wire.FAILED_START, "error": "job refused: bad argv"}, 127,
         "could not start (job refused: bad argv)"),
        ({"status": 0}, 0, "succeeded"),
    ],
)  # fmt: skip
def test_every_path_maps_an_end_the_same_way(res, status, said):
    assert outcome.exit_status(res) == status
    assert outcome.words(res) == said
