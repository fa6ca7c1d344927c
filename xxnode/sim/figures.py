"""Fig. 4 (per-class latency against load, three schedulers) and Fig. 5 (memory
spread and class-based swapping in XX), and cold starts against keep-alive with warm
execution environments (``warm``), each as CSV + PNG + a JSON-able summary."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import simulate
from .config import Arrivals, Cluster, Config, Runtime, Scheduler, Warm
from .metrics import quantile

SCHEDULERS = ("hermod", "xx", "edf")
COLORS = {"hermod": "tab:red", "xx": "tab:blue", "edf": "tab:green", "xx-noidle": "tab:orange"}

FIG4_LOADS = (0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
FIG4_QUICK_LOADS = (0.8, 0.95, 1.05, 1.2)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig4(
    out: Path, quick: bool, seed: int = 1, jobs: int | None = None, log=print
) -> dict[str, Any]:
    """Every scheduler at every load on the identical workload (§4.2): memory
    unlimited and XX's idle list off, so placement is power-of-k for XX and Hermod."""
    loads = FIG4_QUICK_LOADS if quick else FIG4_LOADS
    njobs = jobs or (10_000 if quick else 200_000)
    base = Config(seed=seed, arrivals=Arrivals(jobs=njobs))
    runs = []
    for load in loads:
        for name in SCHEDULERS:
            cfg = replace(
                base,
                arrivals=replace(base.arrivals, load=load),
                scheduler=Scheduler(name=name, idle_list=False),
            )
            s = simulate(cfg).summary()
            runs.append(s)
            top = s["classes"][cfg.classes.names[-1]]
            log(
                f"fig4 load={load:.2f} {name:6s} top-class slowdown p99={top['slowdown_p99']:.2f} "
                f"({s['wall_s']:.1f}s, {s['jobs_per_s']:.0f} jobs/s)"
            )
    out.mkdir(parents=True, exist_ok=True)
    names, prices = base.classes.names, base.classes.prices
    rows = []
    for s in runs:
        for c, price in zip(names, prices, strict=True):
            v = s["classes"][c]
            rows.append(
                {"scheduler": s["scheduler"], "load": s["load"], "class": c, "price": price}
                | {key: v[key] for key in v}
            )
    with open(out / "fig4.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot4(out / "fig4.png", rows, names, prices, njobs)
    top, low = names[-1], names[0]

    def pick(sched, c, key):
        return {
            f"{r['load']:.2f}": r[key] for r in rows if r["scheduler"] == sched and r["class"] == c
        }

    return {
        "figure": "fig4",
        "jobs_per_point": njobs,
        "loads": list(loads),
        "top_class": top,
        "top_class_slowdown_p99": {s: pick(s, top, "slowdown_p99") for s in SCHEDULERS},
        "top_class_response_p99_s": {s: pick(s, top, "response_p99") for s in SCHEDULERS},
        "low_class_slowdown_p50": {s: pick(s, low, "slowdown_p50") for s in SCHEDULERS},
        "low_class_finished_share": {s: pick(s, low, "finished_share") for s in SCHEDULERS},
        "files": [str(out / "fig4.csv"), str(out / "fig4.png")],
    }


def _plot4(path: Path, rows, names, prices, njobs) -> None:
    plt = _plt()
    metrics = [
        ("slowdown_p50", "slowdown median"),
        ("slowdown_p99", "slowdown p99"),
        ("response_p50", "response median (s)"),
        ("response_p99", "response p99 (s)"),
    ]
    fig, axes = plt.subplots(
        len(metrics), len(names), figsize=(3.2 * len(names), 2.6 * len(metrics)), sharex=True
    )
    for ci, (c, price) in enumerate(zip(names, prices, strict=True)):
        for mi, (key, label) in enumerate(metrics):
            ax = axes[mi][ci]
            for sched in SCHEDULERS:
                pts = sorted(
                    (r["load"], r[key]) for r in rows if r["scheduler"] == sched and r["class"] == c
                )
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    "o-",
                    ms=3,
                    color=COLORS[sched],
                    label=sched,
                )
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            if mi == 0:
                ax.set_title(f"class {c} (price {price:g})")
            if ci == 0:
                ax.set_ylabel(label)
            if mi == len(metrics) - 1:
                ax.set_xlabel("offered load")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"Fig. 4: per-class latency vs offered load ({njobs} jobs/point; unfinished jobs excluded, see CSV)"
    )
    # A fixed layout: tight_layout on 20 log-scale panels cost seconds per figure.
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.06, top=0.93, wspace=0.25, hspace=0.12)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fig5(out: Path, quick: bool, seed: int = 1, log=print) -> dict[str, Any]:
    """XX with 32 GB per machine under a rising load (§4.3): how evenly memory is
    used, when swapping starts, whose memory is swapped and on which machines."""
    step = 3.0 if quick else 12.0
    loads = (0.6, 0.8, 0.9, 1.0, 1.1, 1.2)
    sched = tuple((step, ld) for ld in loads)
    base = Config(
        seed=seed,
        cluster=Cluster(memory_gb=32.0),
        arrivals=Arrivals(schedule=sched),
        scheduler=Scheduler(name="xx", idle_list=True, sample_every=step / 12),
    )
    variants = {
        "xx": base,
        "xx-noidle": replace(base, scheduler=replace(base.scheduler, idle_list=False)),
    }
    out.mkdir(parents=True, exist_ok=True)
    names = base.classes.names
    summary: dict[str, Any] = {
        "figure": "fig5",
        "load_steps": [list(s) for s in sched],
        "variants": {},
    }
    util_rows, mach_rows, class_rows = [], [], []
    series = {}
    for vname, cfg in variants.items():
        r = simulate(cfg)
        mem = r.extra["memory"]
        log(f"fig5 {vname}: {r.jobs} jobs, {r.wall_s:.1f}s wall")
        prev = None
        ts, bands, swap_rate = [], [], []
        for t, utils, swap_cum in mem["samples"]:
            u = sorted(utils)
            d = (
                [0.0] * len(swap_cum)
                if prev is None
                else [a - b for a, b in zip(swap_cum, prev[1], strict=True)]
            )
            dt = t - prev[0] if prev is not None else 0.0
            prev = (t, swap_cum)
            band = [u[0], quantile(u, 0.1), quantile(u, 0.5), quantile(u, 0.9), u[-1]]
            rate = sum(d) / (1 << 30) / dt if dt else 0.0
            load = loads[min(int(t // step), len(loads) - 1)]
            util_rows.append(
                {"variant": vname, "t": t, "load": load}
                | dict(
                    zip(
                        ("util_min", "util_p10", "util_p50", "util_p90", "util_max"),
                        band,
                        strict=True,
                    )
                )
                | {"swap_out_gb_per_s": rate}
            )
            ts.append(t)
            bands.append(band)
            swap_rate.append(rate)
        per_m = mem["swap_out_gb_per_machine"]
        for i, (so, si, fu) in enumerate(
            zip(per_m, mem["swap_in_gb_per_machine"], mem["first_swap_util"], strict=True)
        ):
            mach_rows.append(
                {
                    "variant": vname,
                    "machine": i,
                    "swap_out_gb": so,
                    "swap_in_gb": si,
                    "first_swap_util": fu,
                }
            )
        for c in names:
            class_rows.append(
                {"variant": vname, "class": c, "swap_out_gb": mem["swap_out_gb_per_class"][c]}
            )
        series[vname] = (ts, bands, swap_rate, per_m, mem["swap_out_gb_per_class"])
        summary["variants"][vname] = _fig5_summary(
            ts, bands, swap_rate, per_m, mem, names, step, loads
        )
    for fname, rows in (
        ("fig5_util.csv", util_rows),
        ("fig5_swap_machine.csv", mach_rows),
        ("fig5_swap_class.csv", class_rows),
    ):
        with open(out / fname, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    _plot5(out / "fig5.png", series, names, step, loads)
    summary["files"] = [
        str(out / n)
        for n in ("fig5_util.csv", "fig5_swap_machine.csv", "fig5_swap_class.csv", "fig5.png")
    ]
    return summary


def _fig5_summary(ts, bands, swap_rate, per_m, mem, names, step, loads) -> dict[str, Any]:
    spread = {}
    for k, ld in enumerate(loads):  # averages over the 2nd half of each load step
        idx = [i for i, t in enumerate(ts) if step * (k + 0.5) <= t < step * (k + 1)]
        if idx:
            spread[f"{ld:.2f}"] = {
                "util_p50": sum(bands[i][2] for i in idx) / len(idx),
                "p90_minus_p10": sum(bands[i][3] - bands[i][1] for i in idx) / len(idx),
                "max_minus_min": sum(bands[i][4] - bands[i][0] for i in idx) / len(idx),
                "swap_out_gb_per_s": sum(swap_rate[i] for i in idx) / len(idx),
            }
    first = next((i for i, r in enumerate(swap_rate) if r > 0), None)
    tot = sum(per_m)
    mean = tot / len(per_m)
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_m) / len(per_m))
    per_class = mem["swap_out_gb_per_class"]
    fsu = [u for u in mem["first_swap_util"] if u is not None]
    return {
        "spread_by_load": spread,
        "first_swap_time_s": ts[first] if first is not None else None,
        "cluster_util_p50_at_first_swap": bands[first][2] if first is not None else None,
        "machines_that_swapped": len(fsu),
        "swap_out_gb_total": tot,
        "swap_out_cv_across_machines": sd / mean if mean else None,
        "swap_out_max_over_mean": max(per_m) / mean if mean else None,
        "swap_out_share_per_class": {c: (per_class[c] / tot if tot else 0.0) for c in names},
        "swap_out_share_from_running_jobs": mem["swap_out_gb_from_running"] / tot if tot else 0.0,
        "swap_in_gb_total": sum(mem["swap_in_gb_per_machine"]),
    }


def _plot5(path: Path, series, names, step, loads) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    for vname, (ts, bands, *_rest) in series.items():
        col = COLORS[vname]
        ax.fill_between(ts, [b[0] for b in bands], [b[4] for b in bands], color=col, alpha=0.12)
        ax.fill_between(ts, [b[1] for b in bands], [b[3] for b in bands], color=col, alpha=0.3)
        ax.plot(ts, [b[2] for b in bands], color=col, label=f"{vname}: median, p10-p90, min-max")
    for k, ld in enumerate(loads):
        ax.axvline(step * k, color="grey", lw=0.5)
        ax.text(step * (k + 0.05), 1.02, f"load {ld:g}", fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("memory utilisation (resident / 32 GB)")
    ax.set_xlabel("simulated time (s)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("(a) spread of memory utilisation across machines")
    ax = axes[0][1]
    for vname, (_ts, bands, swap_rate, *_rest) in series.items():
        ax.scatter([b[2] for b in bands], swap_rate, s=8, color=COLORS[vname], label=vname)
    ax.set_xlabel("median machine utilisation at sample")
    ax.set_ylabel("cluster swap-out rate (GB/s)")
    ax.set_title("(b) cluster swap-out rate against median utilisation")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for vname, (_ts, _b, _s, per_m, _c) in series.items():
        ax.plot(range(len(per_m)), sorted(per_m, reverse=True), color=COLORS[vname], label=vname)
    ax.set_xlabel("machine (sorted by amount swapped)")
    ax.set_ylabel("swapped out over the run (GB)")
    ax.set_title("(c) swap per machine")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    width = 0.8 / len(series)
    for vi, (vname, (*_r, per_c)) in enumerate(series.items()):
        ax.bar(
            [i + vi * width for i in range(len(names))],
            [per_c[c] for c in names],
            width,
            color=COLORS[vname],
            label=vname,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_xlabel("price class (low -> high)")
    ax.set_ylabel("swapped out (GB)")
    ax.set_title("(d) swap per class")
    ax.legend(fontsize=8)
    fig.suptitle("Fig. 5: XX with 32 GB/machine under a rising load (swap time not simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- warm environments: cold starts against keep-alive --------------------------------------

# Cold-start models (ms): XX's zygote fork (our measured p50) against the paper's anchor
# for a Lambda-like sandbox start, drawn once per function in [100, 250].
WARM_MODELS = {"xx-zygote": (8.0, None), "lambda-like": (100.0, 250.0)}
WARM_COLORS = {"xx-zygote": "tab:blue", "lambda-like": "tab:red"}
WARM_KEEP_ALIVE = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, None)  # None: never expire
WARM_QUICK_KEEP_ALIVE = (0.0, 1.0, 10.0, None)


def _ka_label(ka: float | None) -> str:
    return "inf" if ka is None else f"{ka:g}"


def warm_base(seed: int = 1, jobs: int = 100_000) -> Config:
    """The workload of the warm-pool figure: 200 functions with Zipf(1) popularity on 10
    machines x 8 cores at load 0.6, power-of-k placement (k = 3), memory unlimited."""
    return Config(
        seed=seed,
        cluster=Cluster(machines=10, cores=8, shards=2, k=3),
        arrivals=Arrivals(load=0.6, jobs=jobs, warmup=0.2),
        runtime=Runtime(functions=200, popularity="zipf", zipf_s=1.0),
        scheduler=Scheduler(name="xx", idle_list=False),
    )


def warm(
    out: Path, quick: bool, seed: int = 1, jobs: int | None = None, log=print
) -> dict[str, Any]:
    """Cold-start fraction and response p99 against keep-alive, XX's zygote against a
    Lambda-like cold start, with the environments kept by ``xxnode.policy.warm_pool``;
    plus the same workload with no cold starts at all (warm mode off) as the floor."""
    kas = WARM_QUICK_KEEP_ALIVE if quick else WARM_KEEP_ALIVE
    base = warm_base(seed, jobs or (20_000 if quick else 100_000))
    top = base.classes.names[-1]
    rows = []

    def row(model, ka, r):
        s = r.summary()
        pooled = sorted(x for a in r.response for x in a)
        w = s.get("warm", {})
        ev = w.get("evicted", {})
        rows.append(
            {
                "model": model,
                "keep_alive_s": _ka_label(ka),
                "cold_fraction": w.get("cold_fraction", 0.0),
                "added_latency_mean_ms": w.get("added_latency_mean_ms", 0.0),
                "response_p50": quantile(pooled, 0.5),
                "response_p99": quantile(pooled, 0.99),
                "top_class_response_p99": s["classes"][top]["response_p99"],
                "finished_share": len(pooled) / sum(r.measured),
                "evicted_keep_alive": ev.get("keep_alive", 0),
                "evicted_cap": ev.get("cap", 0),
                "idle_max_per_function": w.get("idle_max_per_function", 0),
            }
        )
        v = rows[-1]
        log(
            f"warm {model:11s} keep_alive={_ka_label(ka):>4s} cold={v['cold_fraction']:.3f} "
            f"p99={v['response_p99']:.3f}s top p99={v['top_class_response_p99']:.3f}s "
            f"finished={v['finished_share']:.3f} ({r.wall_s:.1f}s)"
        )

    row("no-cold-start", None, simulate(base))
    for model, (cs, cmax) in WARM_MODELS.items():
        for ka in kas:
            w = Warm(enabled=True, keep_alive_s=ka, cold_start_ms=cs, cold_start_max_ms=cmax)
            row(model, ka, simulate(replace(base, warm=w)))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "warm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot_warm(out / "warm.png", rows, kas, base)

    def pick(model, key):
        return {r["keep_alive_s"]: r[key] for r in rows if r["model"] == model}

    floor = rows[0]
    return {
        "figure": "warm",
        "jobs_per_point": base.arrivals.jobs,
        "functions": base.runtime.functions,
        "keep_alive_s": [_ka_label(ka) for ka in kas],
        "no_cold_start": {k: floor[k] for k in ("response_p99", "top_class_response_p99")},
        "cold_fraction": {m: pick(m, "cold_fraction") for m in WARM_MODELS},
        "added_latency_mean_ms": {m: pick(m, "added_latency_mean_ms") for m in WARM_MODELS},
        "response_p99_s": {m: pick(m, "response_p99") for m in WARM_MODELS},
        "top_class_response_p99_s": {m: pick(m, "top_class_response_p99") for m in WARM_MODELS},
        "finished_share": {m: pick(m, "finished_share") for m in WARM_MODELS},
        "files": [str(out / "warm.csv"), str(out / "warm.png")],
    }


def _plot_warm(path: Path, rows, kas, base: Config) -> None:
    plt = _plt()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    xs = list(range(len(kas)))
    labels = [_ka_label(ka).replace("inf", "never") for ka in kas]
    floor = rows[0]
    for model, (cs, cmax) in WARM_MODELS.items():
        mine = {r["keep_alive_s"]: r for r in rows if r["model"] == model}
        rs = [mine[_ka_label(ka)] for ka in kas]
        col = WARM_COLORS[model]
        name = f"{model} ({cs:g} ms)" if cmax is None else f"{model} ({cs:g}-{cmax:g} ms)"
        a.plot(xs, [r["cold_fraction"] for r in rs], "o-", color=col, label=name)
        b.plot(xs, [r["added_latency_mean_ms"] for r in rs], "o-", color=col, label=name)
        c.plot(xs, [r["response_p99"] for r in rs], "o-", color=col, label=f"{model}: all")
        c.plot(
            xs, [r["top_class_response_p99"] for r in rs], "s--", color=col, ms=4,
            label=f"{model}: top class",
        )  # fmt: skip
        for x, r in zip(xs, rs, strict=True):
            if r["finished_share"] < 0.999:
                c.annotate(
                    f"{100 * r['finished_share']:.0f}% fin.", (x, r["response_p99"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7, color=col,
                )  # fmt: skip
    c.axhline(floor["response_p99"], color="grey", lw=1, label="no cold starts: all")
    c.axhline(floor["top_class_response_p99"], color="grey", lw=1, ls="--", label="... top class")
    a.set_ylabel("cold-start fraction (measured invocations)")
    a.set_ylim(0, 1.02)
    b.set_ylabel("cold-start time per invocation, mean (ms)")
    b.set_yscale("log")
    c.set_ylabel("response p99 (s), finished jobs")
    c.set_yscale("log")
    for ax in (a, b, c):
        ax.set_xticks(xs, labels)
        ax.set_xlabel("keep-alive (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    a.set_title("(a) cold starts")
    b.set_title("(b) added latency, mean")
    c.set_title("(c) response p99 (a cold start holds a core)")
    cl, rt = base.cluster, base.runtime
    fig.suptitle(
        f"Warm environments (warm_pool, idle cap {Warm().max_idle_per_function}/function): "
        f"{rt.functions} functions, Zipf({rt.zipf_s:g}), {cl.machines}x{cl.cores} cores, "
        f"load {base.arrivals.load:g}, {base.arrivals.jobs} jobs/point",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
