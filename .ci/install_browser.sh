#!/usr/bin/env bash
# Install what the web demo and its browser test need on a fresh Debian machine, as root:
# Debian's Chromium and ChromeDriver (only when /usr/bin/chromium is missing), then
# requirements-demo.txt into the active virtual environment (else ./.venv, when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
before=$(python -m pip freeze | sort)
python -m pip install -q -r requirements-demo.txt
# the demo's requirements must agree with what the tests installed: none replaced or removed
changed=$(comm -23 <(echo "$before") <(python -m pip freeze | sort) || true)
if [ -n "$changed" ]; then
    echo "requirements-demo.txt changed packages already installed (align the ranges):" >&2
    echo "$changed" >&2
    exit 1
fi
echo "browser test dependencies installed in $(( $(date +%s) - start )) s ($(/usr/bin/chromium --version 2>/dev/null))"
