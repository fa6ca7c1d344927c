"""The simulator against closed-form queueing results.

Each case sets the cluster to a textbook queue (one machine, Poisson arrivals,
exponential or Pareto sizes) and checks the simulated mean response time
against the formula.  Seeds are fixed so the tests are deterministic; run
lengths are chosen so the statistical error (~1%) is well inside the tolerance.
"""

import math

import pytest

from xxnode.sim import simulate
from xxnode.sim.config import Arrivals, Classes, Cluster, Config, Runtime, Scheduler

N = 200_000
ONE_CLASS = Classes(names=("c0",), prices=(1.0,), weights=(1.0,), per="job")
EXP1 = Runtime(dist="exponential", mean=1.0, functions=1)


def cfg(sched, *, cores=1, load, runtime=EXP1, classes=ONE_CLASS, seed=1):
    return Config(
        seed=seed,
        cluster=Cluster(machines=1, cores=cores, shards=1, k=1),
        arrivals=Arrivals(load=load, jobs=N, warmup=0.05, cooldown=0.0, drain=10.0),
        runtime=runtime,
        classes=classes,
        scheduler=Scheduler(name=sched, idle_list=False),
    )


def mean_response(res, cls="c0"):
    s = res.summary()["classes"][cls]
    assert s["finished"] == s["measured"] > 0.9 * N * 0.5
    return s["response_mean"]


def erlang_c(c: int, a: float) -> float:
    """P(wait) in M/M/c with offered load a = lambda/mu (Erlang C)."""
    head = sum(a**k / math.factorial(k) for k in range(c))
    tail = a**c / math.factorial(c) * c / (c - a)
    return tail / (head + tail)


def test_mm1_fcfs():
    rho = 0.5
    want = 1.0 / (1.0 - rho)  # E[T] = 1/(mu - lambda), mu = 1
    got = mean_response(simulate(cfg("xx", load=rho)))
    assert got == pytest.approx(want, rel=0.03)


@pytest.mark.parametrize("c", [4])
def test_mmc_erlang_c(c):
    rho = 0.7
    a = rho * c
    want = erlang_c(c, a) / (c - a) + 1.0  # E[W] = C(c,a)/(c*mu - lambda), plus E[S]
    got = mean_response(simulate(cfg("xx", cores=c, load=rho)))
    assert got == pytest.approx(want, rel=0.03)


def test_mg1_processor_sharing_is_insensitive():
    rho = 0.5
    rt = Runtime(dist="pareto", alpha=3.0, xm_mean=1.0, xm_sd=0.0, functions=1)
    es = 3.0 / 2.0  # Pareto mean alpha*xm/(alpha-1)
    want = es / (1.0 - rho)  # M/G/1-PS: E[T] = E[S]/(1-rho) for any size distribution
    got = mean_response(simulate(cfg("hermod", load=rho, runtime=rt)))
    assert got == pytest.approx(want, rel=0.03)


def test_two_class_preemptive_priority():
    rho = 0.6
    cl = Classes(names=("lo", "hi"), prices=(1.0, 2.0), weights=(0.5, 0.5), per="job")
    res = simulate(cfg("xx", load=rho, classes=cl))
    s_hi = s_lo = rho / 2
    # Preemptive-resume M/M/1, exponential sizes with mean 1 (so lambda*E[S^2]/2 = rho):
    # the high class sees an M/M/1 of its own; the low class waits behind both.
    want_hi = 1.0 / (1.0 - s_hi)
    want_lo = 1.0 / (1.0 - s_hi) + (s_hi + s_lo) / ((1.0 - s_hi) * (1.0 - s_hi - s_lo))
    assert mean_response(res, "hi") == pytest.approx(want_hi, rel=0.03)
    assert mean_response(res, "lo") == pytest.approx(want_lo, rel=0.05)
