"""Throughput of BatchValidator against a bare ``for line in f: orjson.loads(line)`` loop.

Generates a ~200 MB, 50,000-line chat-completions batch file (~4 KB a line) in a temporary directory, then
reads it from disk (page cache) several times with each method and prints the best MB/s (1 MB = 10**6 bytes), and
the validator again with prefix planning (`domain/planning.py`; every line of this file shares its system prompt).

    .venv/bin/python bench/bench_validation.py [--lines N] [--line-bytes B] [--chunk BYTES] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import random
import string
import tempfile
import time
from pathlib import Path

import orjson

try:
    from batchyard.domain.validation import BatchValidator
except ModuleNotFoundError:  # not installed in the venv: run from a checkout
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from batchyard.domain.validation import BatchValidator

ENDPOINT = "/v1/chat/completions"
MODELS = ("gpt-4o-mini", "llama-3.1-8b-instruct")


def _text(rng: random.Random, n: int) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(200)]
    words += ["héllo", "naïve", "日本語", 'quote"d', "tab\there", "line\nbreak", "emoji😀"]
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(words)
        out.append(w)
        size += len(w.encode()) + 1
    return " ".join(out)


def generate(path: Path, lines: int, line_bytes: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    texts = [_text(rng, line_bytes - 330) for _ in range(64)]
    with path.open("wb") as f:
        for i in range(lines):
            req = {
                "custom_id": f"request-{i}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {
                    "model": MODELS[i % 2],
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant. Answer concisely."},
                        {"role": "user", "content": texts[i % len(texts)]},
                    ],
                    "max_tokens": 256,
                    "temperature": 0.2,
                    "metadata": {"n": i, "tags": ["bench", "validation"]},
                },
            }
            f.write(orjson.dumps(req) + b"\n")
    return path.stat().st_size


def run_validator(path: Path, chunk: int, planning: bool = False) -> float:
    t0 = time.perf_counter()
    v = BatchValidator(ENDPOINT, lambda m: m in MODELS, prefix_planning=planning)
    with path.open("rb", buffering=0) as f:
        while block := f.read(chunk):
            v.feed(block)
    res = v.finish()
    dt = time.perf_counter() - t0
    assert res.ok, res.errors[:3]
    return dt


def run_reference(path: Path) -> float:
    t0 = time.perf_counter()
    loads = orjson.loads
    with path.open("rb") as f:
        for line in f:
            loads(line)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--line-bytes", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        size = generate(path, args.lines, args.line_bytes)
        mb = size / 1e6
        print(f"file: {mb:.1f} MB, {args.lines} lines, {size / args.lines:.0f} B/line, cpus={os.cpu_count()}")
        run_reference(path)  # warm the page cache
        ref = min(run_reference(path) for _ in range(args.repeat))
        val = min(run_validator(path, args.chunk) for _ in range(args.repeat))
        print(f"reference  for line in f: orjson.loads(line): {mb / ref:8.1f} MB/s  ({ref * 1e3:.0f} ms)")
        label = f"validator  BatchValidator (chunk {args.chunk} B):"
        print(f"{label}  {mb / val:8.1f} MB/s  ({val * 1e3:.0f} ms)")
        print(f"ratio validator/reference: {ref / val:.2f}")
        # with prefix planning (the default when prefix ordering is on): every line here has a shared context
        planned = min(run_validator(path, args.chunk, planning=True) for _ in range(args.repeat))
        per_line = (planned - val) / args.lines * 1e6
        print(
            f"validator with prefix planning: {mb / planned:8.1f} MB/s  ({planned * 1e3:.0f} ms; "
            f"{per_line:+.2f} us a line)"
        )


if __name__ == "__main__":
    main()
