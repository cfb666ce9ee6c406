#!/usr/bin/env bash
# Fuzzes daffi's wire protocol with cargo-fuzz (libFuzzer): the targets of fuzz/, each for a
# while, starting from its committed corpus. Needs a nightly toolchain (cargo-fuzz builds with
# sanitizer flags stable rejects); installs cargo-fuzz from crates.io when it is missing.
# The committed corpora are also replayed on stable by `cargo test -p daffi-proto`, which
# scripts/test.sh runs. See fuzz/README.md.
set -euo pipefail

usage() {
    cat <<'EOF_USAGE'
usage: scripts/fuzz.sh [options] [target ...]
  target           connection, scanners, handshake, router (default: all of them)
  --seconds N      how long each target runs (default 60)
  --merge          afterwards, add to fuzz/corpus/<target> the inputs of the run that reach
                   code its corpus does not (libFuzzer's -merge=1), to be committed
EOF_USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds=60
merge=0
targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seconds) seconds="${2:?--seconds needs a number}"; shift 2 ;;
        --merge) merge=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(connection scanners handshake router)
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: --seconds takes a whole number" >&2; exit 2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz needs a nightly Rust toolchain (rustup toolchain install nightly)." >&2
    echo "The committed corpora are still checked on stable: cargo test -p daffi-proto fuzzing" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz from crates.io"
    cargo install --locked cargo-fuzz
fi

cd "$ROOT/fuzz"
status=0
for t in "${targets[@]}"; do
    [[ -f "fuzz_targets/$t.rs" ]] || { echo "fuzz.sh: no target $t in fuzz/fuzz_targets" >&2; exit 2; }
    # The fuzzer adds what it finds to a working copy; the committed corpus changes only
    # with --merge.
    mkdir -p "work/$t"
    cp -n "corpus/$t"/* "work/$t"/ 2>/dev/null || true
    echo "== $t: ${seconds} s"
    if ! cargo +nightly fuzz run -O "$t" "work/$t" -- \
        -max_total_time="$seconds" -max_len=300000 -print_final_stats=1; then
        echo "fuzz.sh: $t broke a rule; the input is in fuzz/artifacts/$t/" >&2
        status=1
        continue
    fi
    if [[ $merge -eq 1 ]]; then
        mkdir -p "corpus/$t"
        cargo +nightly fuzz run -O "$t" "corpus/$t" "work/$t" -- -merge=1 -max_len=300000
    fi
done
exit $status
