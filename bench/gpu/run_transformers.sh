#!/usr/bin/env bash
# P6's stand-in on the GPU machine (torch + transformers installed, no vLLM, no network): install the carried
# wheelhouse (bench/gpu/wheels, made here by bench/gpu/make_wheelhouse.sh) into a side directory, check the imports,
# then run bench/gpu/p6_transformers.py under one overall timeout. Arguments are passed on; results go to $OUT
# (or --out DIR). See bench/gpu/README.md for the `run` command.
#   bash bench/gpu/run_transformers.sh               # the measurement (~5-7 minutes)
#   bash bench/gpu/run_transformers.sh --dry-run     # tiny model on the CPU
# PYTHON: the interpreter that has torch and transformers (default python3); P6_TIMEOUT: overall seconds (450).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
py="${PYTHON:-python3}"
wheels="${P6_WHEELS:-$repo/bench/gpu/wheels}"
site="${P6_SITE:-/tmp/p6-site}"
t0=$SECONDS
if compgen -G "$wheels/*.whl" >/dev/null; then
  # --no-deps: the list is complete against the machine's image; --target: the image's own packages stay as
  # they are, the carried ones come first on PYTHONPATH
  timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 120 "$py" - <<'EOF'
import importlib, sys
mods = ["batchyard.cli.main", "batchyard.runtime", "fastapi", "uvicorn", "openai", "pydantic_settings", "orjson",
        "httptools", "httpx", "torch", "transformers", "transformers.cli.serving.server", "tokenizers"]
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001 - any failure to import is reported, all at once
        missing.append(f"{m}: {type(e).__name__}: {e}")
import torch, transformers
from transformers.utils.import_utils import is_serve_available
if not is_serve_available():
    missing.append("transformers serve: is_serve_available() is False (pydantic, fastapi, uvicorn, openai)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}")
if missing:
    sys.exit("cannot import:\n  " + "\n  ".join(missing))
EOF
echo "setup took $((SECONDS - t0))s"
exec timeout -k 15 "${P6_TIMEOUT:-450}" "$py" bench/gpu/p6_transformers.py --tf-python "$py" "$@"
