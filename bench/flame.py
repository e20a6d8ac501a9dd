"""Split a `py-spy record --subprocesses --threads --idle -f raw` capture of the daemon tree into
the two hot paths we care about, and render each as an SVG flame graph with a top-costs table.

- sensor tick: code-server stacks inside the sensor-execution gRPC call (the tick, wall time incl. waits);
- ingest run: the run workers' main threads (start-up imports included: that is part of a run's cost);
- run launch: the code server's StartRun calls (spawning each run worker).

    python bench/flame.py <raw.txt[.gz]> [<out-dir>] [<rate-hz, default 100>]   # re-analyse a saved capture
"""

from __future__ import annotations

import gzip
import html
import json
import re
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import common

_LINE = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def frame_name(frame: str) -> str:
    """`func (path/file.py:123)` -> `func (path/file.py)`: aggregate per function, not per line.
    Non-blocking sampling can read a half-written frame: control bytes become '?' (SVG must stay XML)."""
    frame = _CONTROL.sub("?", frame)
    m = _LINE.match(frame)
    return f"{m.group('name')} ({m.group('file')})" if m else frame


_PROC = re.compile(r'process (\d+):"(.*?)";(?=process \d+:"|thread \()', re.S)


def parse(raw: Path) -> list[tuple[str, int, str, list[str], int]]:
    """(kind, pid, thread, frames root-first, samples) per line. Command lines may hold ';' and quotes."""
    out = []
    text = (
        gzip.decompress(raw.read_bytes()).decode(errors="replace")
        if raw.suffix == ".gz"
        else raw.read_text(errors="replace")
    )
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        cmd, pid, pos = "", 0, 0
        while True:  # nested `process` frames: the last one is the process sampled
            m = _PROC.match(stack, pos)
            if not m:
                break
            pid, cmd, pos = int(m.group(1)), m.group(2), m.end()
        parts = stack[pos:].split(";")
        thread = ""
        if parts and parts[0].startswith("thread ("):
            thread = parts[0].split(":", 1)[1].strip() if ":" in parts[0] else ""
            parts = parts[1:]
        # Import machinery frames only add depth: keep the `<module>` frames, drop importlib's own.
        frames = [frame_name(f) for f in parts if "<frozen importlib" not in f]
        out.append((common.classify(cmd), pid, thread, frames, int(count)))
    return out


def top_costs(stacks: list[tuple[list[str], int]], n: int = 20) -> dict[str, list[tuple[str, int, float]]]:
    total = sum(c for _, c in stacks) or 1
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, c in stacks:
        if frames:
            self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return {
        "self": [(f, c, round(100 * c / total, 1)) for f, c in self_c.most_common(n)],
        "inclusive": [(f, c, round(100 * c / total, 1)) for f, c in incl.most_common(n * 3)],
    }


# -- SVG ----------------------------------------------------------------------------------------


def _tree(stacks: list[tuple[list[str], int]]) -> dict[str, Any]:
    root: dict[str, Any] = {"name": "all", "value": 0, "children": {}}
    for frames, c in stacks:
        root["value"] += c
        node = root
        for f in frames:
            node = node["children"].setdefault(f, {"name": f, "value": 0, "children": {}})
            node["value"] += c
    return root


def _depth(node: dict[str, Any]) -> int:
    return 1 + max((_depth(c) for c in node["children"].values()), default=0)


def _color(name: str) -> str:
    h = zlib.crc32(name.encode())
    if "feature_pipeline" in name:
        return f"rgb({60 + h % 40},{130 + h % 60},{200 + h % 55})"  # the project's own code: blue
    if any(k in name for k in ("duckdb", "pyarrow", "nats/", "pydantic")):
        return f"rgb({80 + h % 50},{180 + h % 50},{90 + h % 40})"  # data libraries: green
    return f"rgb({205 + h % 50},{90 + h % 120},{40 + h % 40})"  # everything else: warm


def render_svg(stacks: list[tuple[list[str], int]], title: str, path: Path, rate: int, width: int = 1600) -> None:
    root = _tree(stacks)
    total = root["value"] or 1
    fh = 17
    depth = _depth(root)
    height = (depth + 3) * fh
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
        f'font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#fdfdf5"/>',
        f'<text x="8" y="14" font-size="13">{html.escape(title)}: {total} samples '
        f"(~{total / rate:.1f} s at {rate} Hz); blue = feature_pipeline, green = duckdb/pyarrow/nats/pydantic; "
        "hover for names</text>",
    ]

    def walk(node: dict[str, Any], x: float, level: int) -> None:
        w = node["value"] / total * width
        if w < 0.3:
            return
        y = height - (level + 1) * fh
        pct = 100 * node["value"] / total
        label = f"{node['name']} ({node['value']} samples, {pct:.1f}%)"
        chars = int((w - 4) / 6.6)
        text = node["name"] if len(node["name"]) <= chars else node["name"][: max(0, chars - 2)] + ".."
        parts.append(
            f'<g><title>{html.escape(label)}</title><rect x="{x:.2f}" y="{y}" width="{max(w - 0.5, 0.1):.2f}" '
            f'height="{fh - 1}" fill="{_color(node["name"])}" rx="1"/>'
            + (f'<text x="{x + 2:.2f}" y="{y + fh - 5}">{html.escape(text)}</text>' if chars >= 3 else "")
            + "</g>"
        )
        cx = x
        for child in sorted(node["children"].values(), key=lambda c: c["name"]):
            walk(child, cx, level + 1)
            cx += child["value"] / total * width

    walk(root, 0.0, 0)
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def tree_summary(stacks: list[tuple[list[str], int]], min_pct: float = 3.0, max_lines: int = 80) -> list[str]:
    """Top-down call tree, nodes >= min_pct of samples; chains that do not branch are folded."""
    root = _tree(stacks)
    total = root["value"] or 1
    lines: list[str] = []

    def walk(node: dict[str, Any], indent: int) -> None:
        chain = [node]
        while len(node["children"]) == 1:
            (only,) = node["children"].values()
            if only["value"] != node["value"]:
                break
            node = only
            chain.append(node)
        name = node["name"] if len(chain) == 1 else f"{chain[0]['name']} .. {node['name']}"
        lines.append(f"{100 * node['value'] / total:5.1f}%  {'  ' * indent}{name}")
        kids = sorted(node["children"].values(), key=lambda c: -c["value"])
        for child in kids:
            if 100 * child["value"] / total >= min_pct and len(lines) < max_lines:
                walk(child, indent + 1)

    walk(root, 0)
    return lines


# -- analysis -----------------------------------------------------------------------------------


def analyze(raw: Path, out_dir: Path, stamp: str, rate: int = 100) -> dict[str, Any]:
    rows = parse(raw)
    groups: dict[str, list[tuple[list[str], int]]] = {"sensor_tick": [], "ingest_run": [], "run_launch": []}
    for kind, _pid, thread, frames, c in rows:
        if kind == "code server" and any("SensorExecution" in f for f in frames):
            groups["sensor_tick"].append((frames, c))  # the gRPC call that evaluates one tick
        elif kind == "code server" and any(f.startswith("DagsterApiServer.StartRun") for f in frames):
            groups["run_launch"].append((frames, c))  # the code server spawning a run worker
        elif kind == "run worker" and thread.startswith("MainThread"):
            groups["ingest_run"].append((frames, c))
    # One run on its own too: the run worker with the most samples.
    per_run: dict[int, list[tuple[list[str], int]]] = {}
    for kind, pid, thread, frames, c in rows:
        if kind == "run worker" and thread.startswith("MainThread"):
            per_run.setdefault(pid, []).append((frames, c))
    if per_run:
        groups["ingest_run_one"] = max(per_run.values(), key=lambda st: sum(c for _, c in st))
    report: dict[str, Any] = {"raw": str(raw), "rate_hz": rate, "run_workers_sampled": len(per_run)}
    text: list[str] = []
    for name, stacks in groups.items():
        svg = out_dir / f"{stamp}-{name}.svg"
        render_svg(stacks, name.replace("_", " "), svg, rate)
        costs = top_costs(stacks)
        total = sum(c for _, c in stacks)
        tree = tree_summary(stacks)
        report[name] = {"samples": total, "svg": str(svg), "tree": tree, **costs}
        text.append(f"== {name}: {total} samples (~{total / rate:.1f} s wall) -> {svg.name}")
        text.append("-- call tree (>= 3%) --")
        text += tree
        text.append("-- self (leaf) --")
        text += [f"{p:5.1f}%  {c:6d}  {f}" for f, c, p in costs["self"]]
        text.append("-- inclusive --")
        text += [f"{p:5.1f}%  {c:6d}  {f}" for f, c, p in costs["inclusive"]]
        text.append("")
    (out_dir / f"{stamp}-profile.txt").write_text("\n".join(text))
    print("\n".join(line for line in text if not line.startswith(" ") or "%" in line[:7])[:4000])
    return report


if __name__ == "__main__":
    src = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else src.parent
    hz = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    stamp = src.name.split("-profile")[0]
    print(json.dumps({k: v for k, v in analyze(src, out, stamp, hz).items() if k in ("raw",)}, indent=1))
