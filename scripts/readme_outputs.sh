#!/usr/bin/env bash
# Reruns every command whose output README.md, docs/CLI.md and docs/WALKTHROUGH.md show (the blocks marked
# `<!-- output: NAME -->`) and writes the new output into them; see scripts/readme_outputs.py.
#   bash scripts/readme_outputs.sh            rewrite the blocks (about a minute on 2 cores)
#   bash scripts/readme_outputs.sh --check    compare only, as tests/test_readme.py does
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-$PWD/.venv/bin/python}" scripts/readme_outputs.py "$@"
