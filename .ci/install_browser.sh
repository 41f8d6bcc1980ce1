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
python -m pip install -q -r requirements-demo.txt
echo "browser test dependencies installed in $(( $(date +%s) - start )) s ($(/usr/bin/chromium --version 2>/dev/null))"
