"""Assemble the side-by-side table from the JSON files of one scripts/bench.sh run.

    python report.py OUT_DIR [--results bench/RESULTS.md]

OUT_DIR holds one file per contender: reference.json, ours-uring.json, ours-poll.json,
pyzmq.json, socket.json (written by the *_bench.py scripts, or ``{"missing": "why"}``),
iperf3.json (the raw ``iperf3 -J`` output) and meta.json (date, machine). Prints one
markdown table; with --results, also replaces the part of that file between the markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
GiB = 1 << 30

# (file stem, column title), in column order.
CONTENDERS = [
    ("reference", "reference 3.0.1"),
    ("ours-uring", "ours uring"),
    ("ours-poll", "ours poll"),
    ("pyzmq", "pyzmq"),
    ("socket", "raw socket"),
    ("iperf3", "iperf3"),
]
OURS = ("ours-uring", "ours-poll")
# The rows a contender has (by name prefix), where not all: "missing" shows only there.
ROWS_OF = {
    "pyzmq": ("seq_", "echo_", "mem_"),
    "socket": ("seq_", "echo_", "mem_"),
    "iperf3": ("echo_", "stream_"),
}
# Ratio columns: ours (uring / poll) divided by this contender, on the rows where both ran.
RATIO_TO = [("reference", "ours / ref"), ("pyzmq", "ours / pyzmq"), ("iperf3", "ours / iperf3")]

# Row order and labels; rows a contender reports that are not listed here come last.
ROWS = {
    "seq_pickle_1k5": "sequential rpc, 1.5 KB dict, PICKLE",
    "seq_opaque_1k5": "sequential rpc, 1.5 KB bytes, OPAQUE",
    "echo_1MiB": "OPAQUE echo 1 MiB",
    "echo_8MiB": "OPAQUE echo 8 MiB",
    "echo_28MiB": "OPAQUE echo 28 MiB",
    "echo_1GiB": "OPAQUE echo 1 GiB",
    "stream_1MiB": "stream_nowait of 1 MiB chunks, one way",
    "conc8_shared": "8 threads, one shared connection, workers=4",
    "conc8_per_client": "8 threads, one client each, workers=4",
    "aio_seq_pickle": "asyncio, sequential PICKLE (AsyncService)",
    "aio_conc8": "asyncio, 8 tasks, one connection, AsyncService workers=4",
    "aio_conc200": "asyncio, 200 tasks, one connection, AsyncService workers=10",
    "router_seq_pickle": "via a Router, sequential PICKLE",
    "router_seq_opaque": "via a Router, sequential OPAQUE 1.5 KB",
    "router_echo_28MiB": "via a Router, OPAQUE echo 28 MiB",
    "router_conc8": "via a Router, 8 clients to 2 workers (workers=4)",
    "mem_2GiB_client": "peak RSS echoing 2 GiB: client (lower is better)",
    "mem_2GiB_server": "peak RSS echoing 2 GiB: server (lower is better)",
}


def load(out_dir: Path) -> dict[str, dict]:
    """Every contender's file as ``{"workloads": {...}}`` or ``{"missing": reason}``."""
    data = {}
    for stem, _ in CONTENDERS:
        path = out_dir / f"{stem}.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raw = {"missing": "not run"}
        except json.JSONDecodeError as exc:
            raw = {"missing": f"unreadable output ({exc})"}
        data[stem] = iperf3_rows(raw) if stem == "iperf3" and "missing" not in raw else raw
    return data


def iperf3_rows(raw: dict) -> dict:
    """iperf3's one-way loopback throughput, shown on every echo and stream row (the ceiling)."""
    if "error" in raw:
        return {"missing": raw["error"]}
    bps = raw["end"]["sum_received"]["bits_per_second"]
    row = {"value": bps / 8 / GiB, "unit": "GiB/s", "one_way": True}
    return {"workloads": {name: row for name in ROWS if name.startswith(("echo_", "stream_"))}}


def fmt(value: float, unit: str) -> str:
    if unit == "calls/s":
        return f"{value:,.0f}"
    if unit == "× payload":
        return f"{value:.2f}×"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


class Notes:
    """Footnotes for cells that could not be measured, numbered once per distinct text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def cell(result: dict | None, missing: str | None, who: str, notes: Notes) -> str:
    if missing is not None:
        return "missing " + notes.ref(f"{who}: {missing}")
    if result is None:
        return "–"
    if result.get("value") is None:
        return "n/a " + notes.ref(f"{who}: {result.get('error', 'no value')}")
    return fmt(result["value"], result["unit"])


def missing_here(data: dict, stem: str, row: str) -> str | None:
    """Why ``stem`` has no figures, on the rows it would have had; else None."""
    if "missing" in data and row.startswith(ROWS_OF.get(stem, "")):
        return data["missing"]
    return None


def ratio(ours: list[dict | None], other: dict | None) -> str:
    if not other or other.get("value") in (None, 0):
        return "–"
    parts = [f"{r['value'] / other['value']:.2f}×" if r and r.get("value") else "–" for r in ours]
    return "–" if all(p == "–" for p in parts) else " / ".join(parts)


def table(data: dict[str, dict]) -> tuple[str, list[str]]:
    notes = Notes()
    names = list(ROWS)
    for stem, _ in CONTENDERS:
        names += [n for n in data[stem].get("workloads", {}) if n not in names]
    head = ["workload", "unit"] + [title for _, title in CONTENDERS] + [t for _, t in RATIO_TO]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for name in names:
        results = {stem: data[stem].get("workloads", {}).get(name) for stem, _ in CONTENDERS}
        if not any(r for stem, r in results.items() if stem != "iperf3"):
            continue  # iperf3 alone (it is shown on every echo row) makes no row
        unit = next(r["unit"] for r in results.values() if r and r.get("unit"))
        cells = [
            cell(results[stem], missing_here(data[stem], stem, name), title, notes)
            for stem, title in CONTENDERS
        ]
        ours = [results[stem] for stem in OURS]
        ratios = [ratio(ours, results[stem]) for stem, _ in RATIO_TO]
        label = ROWS.get(name, name)
        lines.append("| " + " | ".join([label, unit, *cells, *ratios]) + " |")
    return "\n".join(lines), notes.texts


def machine_line(meta: dict) -> str:
    keys = ["date", "kernel", "nproc", "cpu", "idle", "seconds", "rounds", "commit"]
    labels = {
        "nproc": "CPUs",
        "idle": "CPU idle",
        "seconds": "s per workload",
        "rounds": "rounds (median kept)",
    }
    return "; ".join(f"{labels.get(k, k)}: {meta[k]}" for k in keys if meta.get(k))


def render(out_dir: Path) -> str:
    data = load(out_dir)
    meta_path = out_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    body, notes = table(data)
    parts = [f"Measured {machine_line(meta)}.", "", body]
    if notes:
        parts += ["", *(f"- [{i}] {text}" for i, text in enumerate(notes, 1))]
    return "\n".join(parts) + "\n"


def update_results(path: Path, text: str) -> None:
    """Replace what lies between the markers (or append the markers and the text)."""
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}{END}\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :].lstrip("\n")
    else:
        new = old + ("\n" if old else "") + block
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--results", type=Path, help="markdown file to update")
    args = p.parse_args()
    text = render(args.out_dir)
    sys.stdout.write(text)
    if args.results:
        update_results(args.results, text)


if __name__ == "__main__":
    main()
