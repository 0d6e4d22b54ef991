#!/usr/bin/env bash
# Wheels of what batchyard and `transformers serve` need beyond what the GPU machine's image has (torch 2.11,
# transformers 5.17, aiohttp, click, numpy, rich, uvloop, prometheus-client, h11, idna, typer are there; pydantic,
# fastapi, uvicorn, openai are not: /work/.library/device/KINDS.md's package list), for its Python 3.12 on x86-64, into bench/gpu/wheels (git-ignored; ~15 MiB).
#   bench/gpu/make_wheelhouse.sh            # cp312 (the GPU machine)
#   PY_VERSION=3.11 bench/gpu/make_wheelhouse.sh /tmp/wheels311   # the same list for this machine's dry run
# The versions are the ones batchyard's own tests run with (pip list in the project's venv, 2026-12-01).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/wheels}"
pyv="${PY_VERSION:-3.12}"
mkdir -p "$dest"
pkgs=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 orjson==3.13.0 python-multipart==0.0.34
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5
  annotated-types==0.8.0 annotated-doc==0.0.7 typing-extensions==4.16.0 anyio==4.16.0 sniffio==1.3.1
  openai==3.57.0 jiter==0.19.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 opentelemetry-api==1.45.2
  fastapi-offline==1.7.7
)
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp "${plat[@]}" \
  -d "$dest" "${pkgs[@]}"
du -sh "$dest"
ls "$dest"
