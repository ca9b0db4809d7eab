#!/usr/bin/env bash
# Everything a fresh machine needs to run the demo (and, with --test, the tests): redis-server
# (and Chromium, for the browser test, and openssl) from Debian, a virtualenv, and the project installed with
# exactly the pinned versions in constraints.txt. Safe to run again: it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# What it says goes to stderr: `make demo > out.json` must get the demo's JSON alone.
exec 1>&2

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
    missing+=(chromium)
fi
# The managed-Redis test makes its own TLS certificates.
if [ "${1:-}" = "--test" ] && ! command -v openssl >/dev/null 2>&1; then
    missing+=(openssl)
fi
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    echo "bootstrap: installing ${missing[*]} from Debian" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.installed-$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "bootstrap: installing Python packages into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
