"""Benchmark harness for feature_pipeline: ceiling, baseline, backlog drain, steady state, growth.

    /work/main/.venv/bin/python bench/run.py [--events N] [--users U] [--quick] [--rates 1000,5000,20000]

Starts its own nats-server (127.0.0.1, free port, temp store) and the real dagster-daemon on
workspace.yaml with a temp DAGSTER_HOME; prints one table and writes bench/results/<timestamp>.json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import VENV_BIN, log, on_cleanup, run_cleanups  # noqa: E402

from feature_pipeline.ingest.tick import FETCH_CHUNK  # noqa: E402

PHASES = ("ceiling", "baseline", "drain", "steady", "growth")
DRAIN_TARGET, DRAIN_TARGET_LARGE = 30_000, 35_000  # ev/s from the first fetch: below 1 M events, from 1 M
P95_TARGET_S = 5.5  # publish->commit at 1 000 ev/s: within 10 % of the sensor daemon's 5 s loop
GIB_MIB = 1024.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, help="backlog size (default 1 000 000; --quick 100 000)")
    ap.add_argument("--users", type=int, default=100_000, help="distinct users in the generated events")
    ap.add_argument("--quick", action="store_true", help="smaller backlog, 30 s steady phases, 100k vs 1M growth")
    ap.add_argument("--rates", default="1000,5000,20000", help="steady-state producer rates, events/s")
    ap.add_argument("--steady-seconds", type=float, help="seconds per steady rate (default 120; --quick 30)")
    ap.add_argument(
        "--steady-drain-timeout",
        type=float,
        help="wait after each steady phase for the pipeline to catch up (default 2 x steady seconds)",
    )
    ap.add_argument("--baseline-events", type=int, default=5000)
    ap.add_argument("--fetch-batch", type=int, default=1000, help="ceiling (a): PullSubscription.fetch batch")
    ap.add_argument(
        "--raw-batch", type=int, help="ceiling (b): raw pull batch (default: the pipeline's pull size, 20 000)"
    )
    ap.add_argument("--drain-timeout", type=float, help="backlog drain hard timeout (default 180 + events/500 s)")
    ap.add_argument("--growth-small", type=int, help="stored events, small case (default 1M; --quick 100k)")
    ap.add_argument("--growth-large", type=int, help="stored events, large case (default 10M; --quick 1M)")
    ap.add_argument("--growth-batch", type=int, default=100_000)
    ap.add_argument("--growth-reps", type=int, help="batches applied per size (default 3; --quick 2)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list out of {','.join(PHASES)}")
    ap.add_argument(
        "--launcher",
        choices=("warm", "spawn"),
        default="warm",
        help="runs on the warm local worker, as `feature-pipeline up` starts them (default), or a process per run",
    )
    ap.add_argument("--profile", action="store_true", help="py-spy the daemon tree (--subprocesses) during the drain")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, store, DAGSTER_HOME)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    a.events = a.events or (100_000 if a.quick else 1_000_000)
    a.steady_seconds = a.steady_seconds or (30.0 if a.quick else 120.0)
    a.steady_drain_timeout = a.steady_drain_timeout or 2 * a.steady_seconds
    a.drain_timeout = a.drain_timeout or 180 + a.events / 500
    a.growth_small = a.growth_small or (100_000 if a.quick else 1_000_000)
    a.growth_large = a.growth_large or (1_000_000 if a.quick else 10_000_000)
    a.growth_reps = a.growth_reps or (2 if a.quick else 3)
    a.rates = [int(r) for r in a.rates.split(",") if r.strip()]
    a.phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    bad = set(a.phases) - set(PHASES)
    if bad:
        ap.error(f"unknown phases {sorted(bad)}")
    return a


def budget(a: argparse.Namespace) -> float:
    """Hard cap for the whole run, from the per-phase timeouts."""
    total = 120 + 60 + a.events / 5000  # start-up, publishing
    if "ceiling" in a.phases:
        total += 2 * (60 + a.events / 2000)
    if "baseline" in a.phases:
        total += 180
    if "drain" in a.phases or "steady" in a.phases:
        total += a.drain_timeout + 60
    if "steady" in a.phases:
        total += len(a.rates) * (a.steady_seconds + 60 + a.steady_drain_timeout + 30)
    if "growth" in a.phases:
        total += 300 + a.growth_large / 5000
    return total


# -- py-spy -------------------------------------------------------------------------------------


def start_profiler(pid: int, raw_path: Path, rate: int) -> subprocess.Popen[bytes]:
    cmd = [
        str(VENV_BIN / "py-spy"), "record", "--subprocesses", "--idle", "--threads", "--nonblocking",
        "-r", str(rate), "-f", "raw", "-o", str(raw_path), "-p", str(pid),
    ]  # fmt: skip
    logf = open(raw_path.with_name(raw_path.name + ".log"), "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    logf.close()
    on_cleanup(lambda: common.kill_pid(proc.pid))
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        common.kill_pid(proc.pid)


# -- report -------------------------------------------------------------------------------------


def _fmt(x: Any, unit: str = "", nd: int = 0) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float | int):
        return f"{x:,.{nd}f}{unit}"
    return f"{x}{unit}"


def _ok(cond: bool | None) -> str:
    return "" if cond is None else ("PASS" if cond else "FAIL")


def build_table(r: dict[str, Any], a: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    if r.get("error"):
        rows.append(["ERROR (figures below are partial)", r["error"][:120], "", ""])
    m = r["machine"]
    rows.append(["machine", f"nproc {m['nproc']}, {m['cpu_model']}, {m['mem_total_gib']} GiB RAM", "", ""])
    rows.append(
        [
            "load average at start / end",
            f"{m['loadavg_at_start'][0]:.2f} / {m.get('loadavg_at_end', [0])[0]:.2f}",
            "",
            "",
        ]
    )
    if "publish" in r:
        rows.append(
            ["setup: publish backlog (core publish + PubAck)", _fmt(r["publish"]["events_per_s"], " ev/s"), "", ""]
        )
    c = r.get("ceiling")
    if c:
        rows.append(
            [
                f"ceiling (a) fetch({c['fetch']['batch']}) + ack, {c['fetch']['events']:,} ev",
                _fmt(c["fetch"]["events_per_s"], " ev/s"),
                "",
                "",
            ]
        )
        rows.append(
            [
                f"ceiling (b) raw pull({c['raw']['batch']}) + acks, {c['raw']['events']:,} ev",
                _fmt(c["raw"]["events_per_s"], " ev/s"),
                "",
                "",
            ]
        )
    b = r.get("baseline")
    if b:
        rows.append([f"baseline per-message, {b['events']:,} ev", _fmt(b["events_per_s"], " ev/s"), "", ""])
    d = r.get("drain")
    if d:
        eps = d["events_per_s"]
        label = f"pipeline backlog drain e2e, {d['events']:,} ev"
        rows.append(
            [label, _fmt(eps, " ev/s") + f" ({d['seconds']} s)" + (" TIMED OUT" if d["timed_out"] else ""), "", ""]
        )
        first = d.get("events_per_s_after_first_fetch") or 0.0
        floor = DRAIN_TARGET_LARGE if d["events"] >= 1_000_000 else DRAIN_TARGET
        rows.append(
            [
                "  from the first fetch to lag 0",
                _fmt(first, " ev/s"),
                f">= {floor:,} ev/s",
                _ok(first >= floor and not d["timed_out"]),
            ]
        )
        rows.append(
            [
                "  first fetch / first commit / last commit",
                f"+{d['seconds_to_first_fetch']} / +{d.get('seconds_to_first_commit')} / +{d.get('seconds_to_last_commit')} s",
                "",
                "",
            ]
        )
        runs = d.get("dagster", {}).get("runs", {})
        ticks = d.get("dagster", {}).get("sensor_ticks", {})
        if runs:
            rows.append(
                [
                    "  ingest runs: count / median run s / median queued s",
                    f"{runs['count']} / {runs['run_seconds_median']} / {runs['queued_seconds_median']}",
                    "",
                    "",
                ]
            )
        if ticks:
            rows.append(
                [
                    "  sensor ticks: count / median tick s / median interval s",
                    f"{ticks['count']} / {ticks['tick_seconds_median']} / {ticks['interval_seconds_median']}",
                    "",
                    "",
                ]
            )
        rows.append(["  featurized (user_features rows = distinct users)", _fmt(d.get("featurized")), "", ""])
        if c:
            rows.append(["  ratio pipeline / ceiling(raw)", _fmt(eps / c["raw"]["events_per_s"], "x", 3), "", ""])
            rows.append(
                [
                    "  ratio pipeline (from the first fetch) / ceiling(fetch)",
                    _fmt(first / c["fetch"]["events_per_s"], "x", 3),
                    ">= 1.5x",
                    _ok(first / c["fetch"]["events_per_s"] >= 1.5),
                ]
            )
        if b:
            rows.append(
                [
                    "  ratio pipeline / baseline",
                    _fmt(eps / b["events_per_s"], "x", 1),
                    ">= 100x",
                    _ok(eps / b["events_per_s"] >= 100),
                ]
            )
        for kind in ("daemon", "code server", "run worker", "nats-server"):
            v = d.get("peak_rss", {}).get(kind)
            if not v:
                continue
            peak = max(v["peak_rss_mib"], v["peak_hwm_mib"])
            rows.append(
                [
                    f"  peak RSS {kind} ({v['processes']} proc)",
                    _fmt(peak, " MiB", 0),
                    "<= 1,024 MiB",
                    _ok(peak <= GIB_MIB),
                ]
            )
    for s in r.get("steady", []):
        rate = s["rate_target"]
        partial = " (latency of stored rows only)" if s["stored"] < s["published"] else ""
        rows.append(
            [
                f"steady {rate:,}/s (achieved {s['rate_achieved']:,.0f}/s, {s['seconds']:.0f} s)",
                f"stored {s['stored']:,}/{s['published']:,}{partial}",
                "",
                "",
            ]
        )
        target = f"p95 <= {P95_TARGET_S} s" if rate == 1000 else ""
        rows.append(
            [
                "  publish->commit p50 / p95 / max",
                f"{_fmt(s['latency_p50_s'], '', 2)} / {_fmt(s['latency_p95_s'], '', 2)} / {_fmt(s['latency_max_s'], '', 2)} s",
                target,
                _ok(s["latency_p95_s"] is not None and s["latency_p95_s"] <= P95_TARGET_S) if rate == 1000 else "",
            ]
        )
        bounded_target = "lag not growing" if rate == max(a.rates) else ""
        rows.append(
            [
                "  lag max / at stop / slope / drained after",
                f"{_fmt(s['lag_max'])} / {_fmt(s['lag_at_producer_stop'])} / {_fmt(s['lag_slope_per_s'], '/s', 1)} / {_fmt(s['drained_seconds_after_stop'], ' s', 1)}",
                bounded_target,
                _ok(s["lag_bounded"]) if bounded_target else ("bounded" if s["lag_bounded"] else "grows"),
            ]
        )
    g = r.get("growth")
    if g:
        for size in g["sizes"]:
            rows.append(
                [
                    f"growth: apply_batch({size['batch_events']:,}) at {size['stored_events']:,} stored",
                    _fmt(size["apply_seconds_median"], " s", 2),
                    "",
                    "",
                ]
            )
        ratio = g["ratio_largest_over_smallest"]
        rows.append(["  ratio largest / smallest", _fmt(ratio, "x", 2), "<= 1.3x", _ok(ratio <= 1.3)])
    return rows


def print_table(rows: list[list[str]]) -> str:
    head = ["figure", "value", "target", ""]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    text = "\n".join(lines)
    print("\n" + text + "\n", flush=True)
    return text


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.chdir(HERE.parent)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    import baseline
    import ceiling
    import drain
    import growth

    from feature_pipeline.broker.local import LocalNats

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    if not a.keep:
        on_cleanup(lambda: shutil.rmtree(tmp, ignore_errors=True))
    cap = budget(a)
    common.start_watchdog(cap)
    r: dict[str, Any] = {
        "started": stamp,
        "machine": common.machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    log(f"bench: temp folder {tmp}; hard cap {cap:.0f} s; phases {','.join(a.phases)}")
    sampler = common.RssSampler(0.5)
    sampler.start()
    error: BaseException | None = None
    try:
        nats_srv = LocalNats(tmp / "nats", log_file=str(tmp / "nats.log")).start()
        on_cleanup(nats_srv.kill)
        sampler.watch("nats", nats_srv.proc.pid)
        log(f"nats-server {nats_srv.url} (pid {nats_srv.proc.pid})")
        p = drain.Pipeline(tmp / "pipeline", nats_srv, warm=a.launcher == "warm")
        r["knobs"] = p.settings()
        log("pipeline settings: " + ", ".join(f"{k}={v}" for k, v in r["knobs"].items()))
        # The pipeline's own pull size: one 250 000-message pull overflows the server's per-client
        # pending limit on a 1 M backlog (it closes the connection as a slow consumer).
        raw_batch = a.raw_batch or min(p.batch_max(), FETCH_CHUNK)
        import asyncio

        asyncio.run(common.ensure_streams(nats_srv.url))
        if any(ph in a.phases for ph in ("ceiling", "baseline", "drain")):
            log(f"publishing the backlog: {a.events:,} events over {a.users:,} users")
            rate = asyncio.run(
                common.publish_backlog(nats_srv.url, a.events, a.users, "bk", time.monotonic() + 60 + a.events / 2000)
            )
            r["publish"] = {"events": a.events, "events_per_s": round(rate, 1)}
            log(f"  {rate:,.0f} events/s")
        if "ceiling" in a.phases:
            r["ceiling"] = ceiling.run(nats_srv.url, a.fetch_batch, raw_batch, 60 + a.events / 2000)
        if "baseline" in a.phases:
            r["baseline"] = baseline.run(nats_srv.url, tmp / "baseline.duckdb", a.baseline_events, 150)
        if "drain" in a.phases or "steady" in a.phases:
            p.start()
            assert p.daemon is not None
            sampler.watch("daemon", p.daemon.pid)
            for i, worker in enumerate(p.workers):
                sampler.watch(f"worker{i}", worker.pid)
            log(f"dagster-daemon pid {p.daemon.pid}, DAGSTER_HOME {p.home}, log {p.daemon_log}")
            prof = None
            if "drain" in a.phases:
                if a.profile:
                    time.sleep(3)  # py-spy cannot read an interpreter that has not finished starting
                    prof_raw = a.out / f"{stamp}-profile.raw.txt"
                    roots = [p.daemon.pid, *(w.pid for w in p.workers)]  # the warm worker is not the daemon's child
                    parts = [prof_raw.with_suffix(f".{pid}") for pid in roots]
                    prof = [start_profiler(pid, part, a.profile_rate) for pid, part in zip(roots, parts, strict=True)]
                    log(f"py-spy recording the daemon tree and the run workers into {prof_raw}")
                d = drain.backlog(p, a.events, a.drain_timeout)
                end = time.time()
                if prof:
                    for proc in prof:
                        stop_profiler(proc)
                    prof_raw.write_bytes(
                        b"".join(part.read_bytes() for part in parts if part.exists())
                    )  # samples add up
                    for part in parts:
                        part.unlink(missing_ok=True)
                d["peak_rss"] = sampler.by_kind()
                d["processes"] = list(sampler.procs.values())
                d["dagster"] = p.run_and_tick_stats(p.started_at - 5, end + 1)
                r["drain"] = d
                for kind, v in sorted(d["peak_rss"].items()):
                    log(
                        f"  peak RSS {kind}: {max(v['peak_rss_mib'], v['peak_hwm_mib']):.0f} MiB ({v['processes']} process(es))"
                    )
                log(f"  runs: {d['dagster'].get('runs')}")
                log(f"  ticks: {d['dagster'].get('sensor_ticks')}")
                if prof:
                    import flame

                    r["profile"] = flame.analyze(prof_raw, a.out, stamp, a.profile_rate)
                    gz = prof_raw.with_name(prof_raw.name + ".gz")
                    gz.write_bytes(gzip.compress(prof_raw.read_bytes(), 6))
                    prof_raw.unlink()
                    r["profile"]["raw"] = str(gz)
            if "steady" in a.phases:
                if not drain.wait_idle(p, 120):
                    log("  warning: the pipeline was not idle before the steady phases")
                r["steady"] = []
                for rate in a.rates:
                    t_start = time.time()
                    s = drain.steady(p, rate, a.steady_seconds, a.steady_drain_timeout, a.users)
                    s["dagster"] = p.run_and_tick_stats(t_start, time.time())
                    r["steady"].append(s)
                    drain.wait_idle(p, 30)
                r["peak_rss_all_phases"] = sampler.by_kind()
            p.stop()
        sampler.unwatch("daemon")
        for i in range(len(p.workers)):
            sampler.unwatch(f"worker{i}")
        nats_srv.stop()
        if "growth" in a.phases:
            r["growth"] = growth.run(
                tmp / "growth", [a.growth_small, a.growth_large], a.growth_batch, a.users, a.growth_reps
            )
    except BaseException as exc:  # report what we have, then clean up
        error = exc
        r["error"] = repr(exc)
        log(f"bench failed: {exc!r}")
    finally:
        sampler.stop()
        run_cleanups()
    r["machine"]["loadavg_at_end"] = os.getloadavg()
    rows = build_table(r, a)
    r["table"] = rows
    r["table_text"] = print_table(rows)
    path = a.out / f"{stamp}.json"
    path.write_text(json.dumps(r, indent=1, default=str))
    log(f"wrote {path}")
    if error is not None and not isinstance(error, Exception):
        raise error
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
