#!/usr/bin/env bash
# Installs everything daffi needs to build and test, idempotently; fast when all is there.
#   - the Rust crates (cargo fetch), checked against the machine's Rust toolchain
#   - .venv: a virtualenv with maturin, pytest, ruff, uvloop (the asyncio tests run on it too),
#     and daffi itself built in release mode
#     (rebuilt only when a Rust or packaging source changed since the last build)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { printf '[setup] %s\n' "$*"; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
python=${PYTHON:-python3}
"$python" - <<'PY' || { echo "daffi needs Python 3.10 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$python" -m venv .venv
fi
venv_py="$root/.venv/bin/python"

# Python tools, installed only when missing.
need=()
for pkg in maturin pytest pytest-timeout ruff uvloop; do
    mod=${pkg//-/_}
    [ "$pkg" = maturin ] && { [ -x .venv/bin/maturin ] || need+=("maturin>=1.7,<2"); continue; }
    [ "$pkg" = ruff ] && { [ -x .venv/bin/ruff ] || need+=(ruff); continue; }
    "$venv_py" -c "import $mod" 2>/dev/null || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    "$venv_py" -m pip install -q --disable-pip-version-check "${need[@]}"
fi

# Rust dependencies (no-op when the registry cache is complete).
cargo fetch --locked -q 2>/dev/null || cargo fetch -q

# Build daffi into .venv when its sources changed.
stamp=.venv/.daffi-build-stamp
digest=$(find Cargo.toml Cargo.lock pyproject.toml engine ffi python/daffi -type f \
    \( -name '*.rs' -o -name '*.toml' -o -name '*.lock' -o -name '*.py' -o -name '*.pyi' \) \
    -not -path '*/target/*' -print0 | sort -z | xargs -0 sha1sum | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$venv_py" -c "import daffi._native" 2>/dev/null; then
    say "building daffi (release) into .venv"
    (PATH="$root/.venv/bin:$PATH" VIRTUAL_ENV="$root/.venv" .venv/bin/maturin develop --release -q)
    echo "$digest" > "$stamp"
fi
say "ready: $("$venv_py" -c 'import daffi, daffi._native as n; print("daffi", daffi.__version__, "backend", n.resolve_backend())')"
