#!/usr/bin/env bash
# Quick start: install what is missing, then run the demo (a local etcd plus two rallyd daemons).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m rallypoint.demo "$@"
