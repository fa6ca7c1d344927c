"""xxsim: run the XX simulator, or reproduce the paper's figures.

  xxsim run --config FILE [--json]      one simulation of any workload (JSON or TOML)
  xxsim fig4 --out DIR [--quick] [--json]
  xxsim fig5 --out DIR [--quick] [--json]
  xxsim warm --out DIR [--quick] [--json]   cold starts vs keep-alive (warm environments)

Config errors print one line naming the key and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from . import simulate
from .config import ConfigError, load


def _clean(x: Any) -> Any:
    """JSON without NaN/Infinity (strict parsers reject them): nan -> null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _table(s: dict[str, Any]) -> str:
    lines = [
        f"scheduler={s['scheduler']} load={s['load']:.3f} jobs={s['jobs']} "
        f"wall={s['wall_s']:.2f}s ({s['jobs_per_s']:.0f} jobs/s) sim_end={s['sim_end_s']:.1f}s",
        f"{'class':>8} {'measured':>9} {'finished':>9} {'resp_mean':>10} {'resp_p50':>9} "
        f"{'resp_p99':>9} {'slow_p50':>9} {'slow_p99':>9}",
    ]
    for c, v in s["classes"].items():
        lines.append(
            f"{c:>8} {v['measured']:9d} {v['finished']:9d} {v['response_mean']:10.4f} "
            f"{v['response_p50']:9.4f} {v['response_p99']:9.4f} {v['slowdown_p50']:9.2f} "
            f"{v['slowdown_p99']:9.2f}"
        )
    w = s.get("warm")
    if w is not None:
        lines.append(
            f"warm: keep_alive={w['keep_alive_s']:g}s cold_start={w['cold_start_ms']:g}ms "
            f"cold_fraction={w['cold_fraction']:.4f} "
            f"added_latency_mean={w['added_latency_mean_ms']:.3f}ms evicted={w['evicted']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="xxsim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="simulate one config")
    r.add_argument("--config", required=True, help="JSON or TOML file (see docs/sim.md)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    helps = {
        "fig4": "reproduce the paper's fig4",
        "fig5": "reproduce the paper's fig5",
        "warm": "cold-start fraction and p99 vs keep-alive, zygote vs Lambda-like cold start",
    }
    for name, text in helps.items():
        f = sub.add_parser(name, help=text)
        f.add_argument("--out", required=True, type=Path, help="directory for CSV and PNG")
        f.add_argument("--quick", action="store_true", help="small run (seconds)")
        f.add_argument("--json", action="store_true", help="print the summary as JSON")
        f.add_argument("--seed", type=int, default=1)
        if name in ("fig4", "warm"):
            f.add_argument("--jobs", type=int, default=None, help="jobs per point")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "run":
            s = simulate(load(a.config)).summary()
            print(json.dumps(_clean(s), indent=1) if a.json else _table(s))
            return 0
        from . import figures

        def log(msg: str) -> None:
            print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

        if getattr(a, "jobs", None) is not None and a.jobs < 100:
            raise ConfigError("--jobs: must be >= 100")
        if a.cmd == "fig4":
            s = figures.fig4(a.out, a.quick, a.seed, a.jobs, log=log)
        elif a.cmd == "fig5":
            s = figures.fig5(a.out, a.quick, a.seed, log=log)
        else:
            s = figures.warm(a.out, a.quick, a.seed, a.jobs, log=log)
        print(json.dumps(_clean(s), indent=1) if a.json else f"wrote {', '.join(s['files'])}")
        return 0
    except ConfigError as e:
        print(f"xxsim: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"xxsim: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
