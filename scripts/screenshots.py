"""A scripted look at the Dagster UI: start the stack, drive a short scenario, screenshot the pages.

Starts a nats-server, the daemon and the webserver in a temp folder (the test harness), publishes a
few thousand sample events and some poison, waits until they are stored, then stops ingest_sensor and
waits for stream_monitor to turn ingest_running red. Headless Chromium (Debian's `chromium` package),
driven by Playwright, then captures the asset graph, a stream's page, user_features, its checks and
the runs list at 1600x1000 into docs/screenshots/. Exits 1 when a step or a capture fails.

With `--traffic-minutes N` it first keeps publishing `--rate` events a second for N minutes (ingest
ticking every 30 s), then prints how much time the stream plots cover (the UI plots the last 100
observations); from 61 minutes on it exits 1 unless they cover at least an hour.

    apt-get install chromium && .venv/bin/pip install -e '.[screenshots]'
    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--keep] [--traffic-minutes 65]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg

from feature_pipeline.samples import publish_events
from feature_pipeline.settings import BY_NAME
from feature_pipeline.testing import BIN, REPO, Pipeline, run, wait_for

PAGES = {
    "asset-graph": "/asset-groups/feature_store",
    "stream-signals": "/assets/nats/signals",
    "stream-signals-plots": "/assets/nats/signals",  # its Metadata section switched to Plots
    "user-features": "/assets/user_features",
    "user-features-checks": "/assets/user_features?view=checks",
    "runs": "/runs",
}
SUBJECTS = ["signals.task.synced", "signals.task.completed", "feedback.recommendation.shown"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no Chromium on PATH: install Debian's package with `apt-get install chromium`")


def capture_all(browser: str, base: str, out: Path) -> None:
    """Each page once its data is drawn; Dagster's first-visit community dialog is skipped."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("Playwright is missing: .venv/bin/pip install -e '.[screenshots]'") from None
    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = chrome.new_page(viewport={"width": 1600, "height": 1000})
        for name, path in PAGES.items():
            page.goto(base + path, wait_until="networkidle")
            skip = page.get_by_role("button", name="Skip")
            if skip.count():
                skip.first.click()
            page.wait_for_timeout(3000)  # plots and lineage draw after the data arrives
            if name.endswith("-plots"):
                page.get_by_role("button", name="Plots").first.click()
                page.wait_for_timeout(3000)
                page.get_by_text("consumer_lag_messages").first.scroll_into_view_if_needed()
                page.wait_for_timeout(1000)
            page.screenshot(path=str(out / f"{name}.png"))
            log(f"captured {name}")
        chrome.close()


PLOTTED_POINTS = 100  # observations the UI's plots show
MONITOR_INTERVAL_SECONDS = int(BY_NAME["FEATURE_PIPELINE_MONITOR_INTERVAL_SECONDS"].default)


def traffic(p: Pipeline, minutes: float, rate: float) -> None:
    """Steady traffic, then the time the stream plots cover; an hour is required from 61 minutes on."""
    users = [f"u-{i}" for i in range(50)]
    log(f"publishing {rate} events/s for {minutes} min")
    run(publish_events(p.nats.url, subjects=SUBJECTS, users=users, count=int(rate * minutes * 60), rate=rate, seed=8))
    wait_for(p.settled, 180, "the traffic to be stored and acked")
    with p.instance() as inst:
        records = inst.fetch_observations(dg.AssetKey(["nats", "signals"]), limit=PLOTTED_POINTS).records
    span = (records[0].timestamp - records[-1].timestamp) / 60 if records else 0.0
    log(f"the stream plots cover {span:.1f} min ({len(records)} observations)")
    if minutes >= 61 and span < 60:
        raise RuntimeError(f"the plots cover {span:.1f} min after {minutes} min of traffic, less than an hour")


def scenario(p: Pipeline) -> None:
    users = [f"u-{i}" for i in range(50)]
    run(
        publish_events(
            p.nats.url, subjects=SUBJECTS, users=users, count=3000, rate=None, seed=7, spread=timedelta(days=2)
        )
    )
    run(_publish_poison(p.nats.url))
    wait_for(p.settled, 180, "the events to be stored and acked")
    wait_for(
        lambda: _observed_lag(p) == 0, MONITOR_INTERVAL_SECONDS + 20, "stream_monitor to observe the drained stream"
    )
    log("stored and observed; stopping ingest_sensor")
    stop = [str(BIN / "dagster"), "sensor", "stop", "ingest_sensor", "-w", str(REPO / "workspace.yaml")]
    subprocess.run(stop, env=p.env, cwd=REPO, check=True, capture_output=True, timeout=120)
    key = dg.AssetCheckKey(dg.AssetKey(["nats", "signals"]), "ingest_running")

    def red() -> bool:
        with p.instance() as inst:
            rec = inst.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
        data = rec.event.dagster_event.event_specific_data if rec and rec.event and rec.event.dagster_event else None
        return getattr(data, "passed", None) is False

    wait_for(red, 2 * MONITOR_INTERVAL_SECONDS + 20, "ingest_running to turn red")


def _observed_lag(p: Pipeline) -> int | None:
    with p.instance() as inst:
        records = inst.fetch_observations(dg.AssetKey(["nats", "signals"]), limit=1).records
    meta = records[0].asset_observation.metadata if records and records[0].asset_observation else {}
    figure = meta.get("consumer_lag_messages")
    return None if figure is None else int(figure.value)  # type: ignore[arg-type]


async def _publish_poison(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for i in range(5):
            await js.publish("signals.task.synced", b"not json " + str(i).encode())
    finally:
        await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (daemon and webserver logs)")
    ap.add_argument("--traffic-minutes", type=float, default=0.0, help="steady traffic first, for the plots")
    ap.add_argument("--rate", type=float, default=5.0, help="events per second of that traffic")
    args = ap.parse_args()
    browser = chromium()
    root = Path(tempfile.mkdtemp(prefix="fp-screenshots-"))
    env = {"FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN": "1"}
    if args.traffic_minutes:
        env["FEATURE_PIPELINE_SENSOR_INTERVAL_SECONDS"] = "30"  # a run per 30 s of traffic, not per 5 s
    p = Pipeline(root, env, webserver=True)
    try:
        p.start()
        wait_for(lambda: _up(p.webserver_url), 120, "the webserver")
        if args.traffic_minutes:
            traffic(p, args.traffic_minutes, args.rate)
        scenario(p)
        args.out.mkdir(parents=True, exist_ok=True)
        capture_all(browser, p.webserver_url, args.out)
    except Exception as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        p.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    log(f"wrote {len(PAGES)} screenshots to {args.out}")
    return 0


def _up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/server_info", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
