#!/usr/bin/env bash
# Side-by-side benchmark: ours (uring and poll backends) against the reference daffi 3.0.1,
# pyzmq, raw Python sockets and iperf3, all in one run on this machine, loopback only.
# Prints one markdown table and rewrites the table in bench/RESULTS.md; the raw JSON and
# logs of the run stay in bench/out/. See bench/RESULTS.md for how to read the figures.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/bench.sh [options]
  --quick          1 s per workload, one round, and skip the 1 GiB echo and 2 GiB peak-RSS rows
  --seconds N      time budget per workload (default 2)
  --rounds N       run every contender N times, one after the other in turn, and keep each
                   workload's median round (default 3; the 1 GiB and 2 GiB rows run in the
                   last round only)
  --only A,B       only these workloads (names as in bench/out/*.json, e.g. echo_8MiB)
  --no-setup       do not run scripts/setup.sh before measuring ours
  --idle-default   leave CPU idle states alone (default: hold /dev/cpu_dma_latency at 0)
  --no-results     print the table but leave bench/RESULTS.md untouched
Environment: BENCH_OURS_PYTHON=path measures another build of ours (default .venv/bin/python).
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPARE="$ROOT/bench/compare"
OUT="$ROOT/bench/out"
REF_VENV="$ROOT/.venv-ref"
OURS_PY="${BENCH_OURS_PYTHON:-$ROOT/.venv/bin/python}"
REF_VERSION="3.0.1"
RUN_TIMEOUT=900 # seconds for one contender's whole run; a hang must not stall the table

seconds=2
rounds=3
big_rows=(--huge --mem)
only=()
setup=1
hold_latency=1
write_results=1
while [[ $# -gt 0 ]]; do
    case "$1" in
    --quick) seconds=1 rounds=1 big_rows=() ;;
    --seconds) seconds="$2" && shift ;;
    --rounds) rounds="$2" && shift ;;
    --only) only=(--only "$2") && shift ;;
    --no-setup) setup=0 ;;
    --idle-default) hold_latency=0 ;;
    --no-results) write_results=0 ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && exit 2 ;;
    esac
    shift
done

log() { printf '[bench] %s\n' "$*" >&2; }

# --- what the run needs, installed only when absent ------------------------------------

ensure_iperf3() {
    command -v iperf3 >/dev/null && return
    log "installing iperf3"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null; } ||
        log "could not install iperf3: its column will say 'missing'"
}

ensure_ref_venv() {
    local check="import daffi, zmq; assert daffi.__version__ == '$REF_VERSION', daffi.__version__"
    [[ -x "$REF_VENV/bin/python" ]] && "$REF_VENV/bin/python" -c "$check" 2>/dev/null && return
    log "creating $REF_VENV (daffi==$REF_VERSION, pyzmq)"
    python3 -m venv "$REF_VENV"
    "$REF_VENV/bin/pip" install -q "daffi==$REF_VERSION" pyzmq
    "$REF_VENV/bin/python" -c "$check"
}

# Prints nothing and succeeds when .venv has our build; otherwise says why on stdout.
ours_missing_reason() {
    if [[ ! -x "$OURS_PY" ]]; then
        echo "no $OURS_PY (scripts/setup.sh creates it)"
    elif ! "$OURS_PY" -c "import daffi._native" 2>/dev/null; then
        echo "$OURS_PY cannot import daffi._native (our build is not installed there)"
    fi
}

# --- running the contenders -------------------------------------------------------------

# run NAME PYTHON SCRIPT [ENV=VALUE...]: one contender's JSON into $OUT/NAME.json, its
# progress into $OUT/NAME.log and the terminal. A failed run becomes a "missing" entry.
run() {
    local name="$1" python="$2" script="$3"
    shift 3
    log "== $name"
    if env -u DAFFI_BACKEND "$@" timeout -k 10 "$RUN_TIMEOUT" \
        "$python" "$COMPARE/$script" run --seconds "$seconds" "${big_rows[@]}" "${only[@]}" --label "$name" \
        >"$OUT/$name.json" 2> >(tee "$OUT/$name.log" >&2); then
        return
    else
        local rc=$?
        log "$name failed (exit $rc); see bench/out/$name.log"
        missing "$name" "the run failed (exit $rc), see bench/out/$name.log"
    fi
}

# missing NAME REASON: NAME's columns will say "missing", with REASON as a footnote.
missing() {
    "$REF_VENV/bin/python" -c 'import json, sys; print(json.dumps({"missing": sys.argv[1]}))' "$2" \
        >"$OUT/$1.json"
}

IPERF_PID=""
cleanup() { [[ -z "$IPERF_PID" ]] || kill "$IPERF_PID" 2>/dev/null || true; }
trap cleanup EXIT

run_iperf3() {
    log "== iperf3"
    command -v iperf3 >/dev/null || { missing iperf3 "iperf3 is not installed" && return; }
    local port json="$OUT/iperf3.json"
    port="$("$REF_VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    timeout 60 iperf3 -s -1 -B 127.0.0.1 -p "$port" >"$OUT/iperf3.log" 2>&1 &
    IPERF_PID=$!
    # iperf3 -J exits 0 even when it could not connect (the JSON has an "error" then), and
    # the server needs a moment before it listens: retry while the connection is refused.
    for _ in $(seq 25); do
        iperf3 -c 127.0.0.1 -p "$port" -t 3 -J >"$json" 2>>"$OUT/iperf3.log" || true
        grep -q "Connection refused" "$json" || break
        sleep 0.2
    done
    cleanup # the one-off server has exited after its test, unless the test never ran
    wait "$IPERF_PID" 2>/dev/null || true
    IPERF_PID=""
    grep -q '"error"' "$json" && log "iperf3 failed: $(grep '"error"' "$json")"
    return 0
}

machine_meta() {
    local keys=(date kernel nproc cpu idle seconds rounds commit) values=(
        "$(date -u '+%Y-%m-%d %H:%M UTC')"
        "$(uname -r)"
        "$(nproc)"
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
        "$1"
        "$seconds"
        "$rounds"
        "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)"
    )
    "$REF_VENV/bin/python" -c 'import json, sys; n = len(sys.argv) // 2; print(json.dumps(dict(zip(sys.argv[1 : n + 1], sys.argv[n + 1 :]))))' \
        "${keys[@]}" "${values[@]}" >"$OUT/meta.json"
}

main() {
    rm -rf "$OUT"
    mkdir -p "$OUT"
    ensure_iperf3
    ensure_ref_venv
    if [[ $setup == 1 && -f "$ROOT/scripts/setup.sh" ]]; then
        log "running scripts/setup.sh"
        bash "$ROOT/scripts/setup.sh" >&2 || log "scripts/setup.sh failed; measuring without it"
    fi
    local why
    why="$(ours_missing_reason)"
    [[ -n "$why" ]] && log "ERROR: our build is missing: $why; its columns will say 'missing'"

    # An idle vCPU halts, and waking it costs more than a loopback round trip: while this
    # fd stays open, the kernel keeps idle CPUs polling (PM QoS; released when we exit).
    local idle="default (may halt)"
    if [[ $hold_latency == 1 && -w /dev/cpu_dma_latency ]]; then
        exec 3>/dev/cpu_dma_latency
        printf 0 >&3
        idle="polling (cpu_dma_latency=0)"
    elif [[ $hold_latency == 1 ]]; then
        log "cannot write /dev/cpu_dma_latency (not root?): idle CPUs may halt"
    fi
    machine_meta "$idle"

    # Rounds: every contender in turn, then again, so that a slow minute of this shared
    # machine weighs on all of them alike; the report keeps each workload's median round.
    # The 1 GiB and 2 GiB rows run in the last round only: they leave the kernel busy with
    # memory for a while (measured: the next sequential row ~15% slower), which must not fall
    # on the small rows of other rounds.
    local round contenders=(reference ours-uring ours-poll pyzmq socket) huge=("${big_rows[@]}")
    for round in $(seq "$rounds"); do
        [[ $rounds -gt 1 ]] && log "== round $round of $rounds"
        big_rows=()
        [[ $round -eq $rounds ]] && big_rows=("${huge[@]}")
        run reference "$REF_VENV/bin/python" daffi_bench.py
        for backend in uring poll; do
            if [[ -n "$why" ]]; then
                missing "ours-$backend" "$why"
            else
                run "ours-$backend" "$OURS_PY" daffi_bench.py "DAFFI_BACKEND=$backend"
            fi
        done
        run pyzmq "$REF_VENV/bin/python" zmq_bench.py
        run socket "$REF_VENV/bin/python" socket_bench.py
        mkdir -p "$OUT/round$round"
        for name in "${contenders[@]}"; do
            mv "$OUT/$name.json" "$OUT/round$round/"
            [[ -f "$OUT/$name.log" ]] && mv "$OUT/$name.log" "$OUT/round$round/"
        done
    done
    "$REF_VENV/bin/python" "$COMPARE/median_rounds.py" "$OUT" "${contenders[@]}"
    run_iperf3
    exec 3>&- # back to the default idle behaviour

    local results=()
    [[ $write_results == 1 ]] && results=(--results "$ROOT/bench/RESULTS.md")
    echo
    "$REF_VENV/bin/python" "$COMPARE/report.py" "$OUT" "${results[@]}"
}

main
