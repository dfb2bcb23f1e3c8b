#!/usr/bin/env bash
# Install everything rallypoint needs on a Debian machine, idempotently:
# etcd (Debian's etcd-server, when missing), iproute2 (when missing; the partition tests' network
# namespaces), a virtualenv in .venv, torch 2.13.0 and the project with its test extras. Safe to run again; it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v etcd >/dev/null 2>&1; then
    echo "==> installing etcd-server from Debian's packages"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server etcd-client >/dev/null
fi

if ! command -v ip >/dev/null 2>&1; then
    echo "==> installing iproute2 (network namespaces for the partition tests)"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iproute2 >/dev/null; } \
        || echo "    iproute2 not installed: the partition tests will be skipped"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv .venv || {
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        "$PY" -m venv .venv
    }
fi

if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    echo "==> installing torch 2.13.0"
    .venv/bin/pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c 'import rallypoint, pytest, pyetcd' 2>/dev/null || [ pyproject.toml -nt .venv/.rallypoint-installed ]; then
    echo "==> installing rallypoint with its test extras"
    .venv/bin/pip install -q -e '.[dev]'
    touch .venv/.rallypoint-installed
fi
echo "==> ready: $(etcd --version | head -1), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
