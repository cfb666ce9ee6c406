#!/usr/bin/env bash
# Sets up and runs every test: formatting and lints, the Rust suites, then the Python suite once
# per I/O backend (DAFFI_BACKEND=uring and DAFFI_BACKEND=poll).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
export PYO3_PYTHON="$root/.venv/bin/python"

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt"
cargo fmt --all --check
step "cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
cargo clippy -p daffi-driver --no-default-features --all-targets -q -- -D warnings
step "ruff"
.venv/bin/ruff check python bench scripts
step "Rust tests"
cargo test -q
step "Rust tests, driver without the io-uring feature"
cargo test -q -p daffi-driver --no-default-features
step "Rust Router tests, large payloads relayed through memory (no splice)"
DAFFI_SPLICE=0 cargo test -q -p daffi-runtime --test router

uring_ok=$(.venv/bin/python -c 'import daffi._native as n
try:
    print(n.resolve_backend("uring"))
except Exception:
    print("no")')
for backend in uring poll; do
    if [ "$backend" = uring ] && [ "$uring_ok" != uring ]; then
        echo "io_uring is not available on this machine: the uring run is skipped" >&2
        continue
    fi
    step "Python tests, DAFFI_BACKEND=$backend"
    DAFFI_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 120 python/tests
done
