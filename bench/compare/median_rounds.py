"""Merge the rounds of a benchmark run: ``median_rounds.py OUT_DIR NAME...``.

``OUT_DIR/roundK/NAME.json`` holds round K of contender NAME (as written by a ``*_bench.py``
script, or ``{"missing": "why"}``). For each contender this writes ``OUT_DIR/NAME.json``: the
first round's description, and for each workload the entry of its median round by ``value``
(among the rounds that measured it), with every round's value under ``rounds``. A contender
missing from every round stays missing (with the first round's reason).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"missing": f"unreadable {path.name}: {exc}"}


def median_entry(entries: list[dict]) -> dict:
    """The entry whose value is the median (the lower middle one for an even count)."""
    measured = [e for e in entries if isinstance(e.get("value"), (int, float))]
    measured.sort(key=lambda e: e["value"])
    if not measured:
        return entries[0]
    chosen = dict(measured[(len(measured) - 1) // 2])
    if len(measured) > 1:
        chosen["rounds"] = [e["value"] for e in measured]
    return chosen


def merge(rounds: list[dict]) -> dict:
    present = [r for r in rounds if "missing" not in r]
    if not present:
        return rounds[0]
    merged = {k: v for k, v in present[0].items() if k != "workloads"}
    merged["rounds"] = len(present)
    names: list[str] = []
    for r in present:
        names += [n for n in r.get("workloads", {}) if n not in names]
    merged["workloads"] = {
        n: median_entry([r["workloads"][n] for r in present if n in r.get("workloads", {})]) for n in names
    }
    return merged


def main() -> None:
    out = Path(sys.argv[1])
    round_dirs = sorted(out.glob("round*"), key=lambda p: int(p.name[5:]))
    for name in sys.argv[2:]:
        rounds = [load(d / f"{name}.json") for d in round_dirs if (d / f"{name}.json").exists()]
        merged = merge(rounds) if rounds else {"missing": "no round ran"}
        (out / f"{name}.json").write_text(json.dumps(merged, indent=1) + "\n")


if __name__ == "__main__":
    main()
