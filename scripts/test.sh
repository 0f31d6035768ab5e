#!/usr/bin/env bash
# Run the test suite (sets the environment up first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
