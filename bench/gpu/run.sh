#!/usr/bin/env bash
# P6 on one GPU: install what is missing into a venv, then run bench/gpu/p6_vllm.py (arguments are passed on).
#   bench/gpu/run.sh [--model Qwen/Qwen2.5-0.5B-Instruct] [--n 2000] ...
# P6_VENV picks the venv (default bench/gpu/.venv, git-ignored); PYTHON the interpreter that creates it (>= 3.11).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${P6_VENV:-$repo/bench/gpu/.venv}"
# --system-site-packages: a vLLM already installed in the system python (a vLLM image) is used as it is.
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
py="$venv/bin/python"
has() { "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
need=()
has vllm || need+=(vllm)
has batchyard || need+=(-e "$repo")
# One pip call, so that vLLM's and batchyard's requirements are resolved together.
[ "${#need[@]}" -eq 0 ] || "$py" -m pip install "${need[@]}"
exec "$py" "$repo/bench/gpu/p6_vllm.py" "$@"
