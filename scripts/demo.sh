#!/usr/bin/env bash
# Sets daffi up and runs the demo: a Service and a Client on loopback, rpc calls and a large
# OPAQUE transfer, with the throughput printed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py"
