"""P6 on a GPU without vLLM: `transformers serve` (continuous batching) behind batchyard, against transformers'
own offline batch generation (`generate_batch`) on the same prompts, with a model built on the spot.

    python bench/gpu/p6_transformers.py [--out DIR]      # on the GPU machine (bench/gpu/run_transformers.sh)
    python bench/gpu/p6_transformers.py --dry-run        # the same path on the CPU, tiny model, in ~35 s

Phases, each with its own time limit inside an overall budget (--budget-s):
1. inputs: one chat file per variant (below), each with its own prompts (a prompt seen by an engine once is in its
   prefix cache: no two runs share one); max_tokens fixed, temperature 0; the model has no EOS token, so every
   request generates exactly max_tokens tokens on both sides.
2. build (tf_side.py build): a byte-level BPE tokenizer trained on the prompts' text, a Qwen2-shaped model with
   random weights (Qwen2.5-0.5B's shape on the GPU, hidden 64 and 2 layers for --dry-run), saved to a directory.
3. reference (tf_side.py reference, its own process, which frees the GPU when it exits): `generate_batch` over every
   variant's file; timed from the first request's arrival to the last one's end (the load and the continuous
   batching warm-up not counted).
4. `transformers serve MODEL_DIR --continuous-batching` on 127.0.0.1, warmed up with a burst of unrelated requests.
5. batchyard serve --upstream http://127.0.0.1:PORT/v1 (SQLite + a local directory); each batch variant's file
   goes through the openai SDK: upload -> create -> completed -> output downloaded (the ratio is timed over all of
   it); the direct variants drive `transformers serve` itself with the same number of requests in flight.

Variants: prefix (8 system prompts of ~600 tokens shared by all lines, shuffled), random (no shared prefix),
prefix-noorder (batchyard --no-prefix-ordering), prefix-direct and random-direct (no batchyard). The results go to
OUT/p6_transformers.json and OUT/p6_transformers.md (a markdown table); the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from p6_common import Budget, PhaseError, Procs, brief, cb_flags, run_phase
from p6_report import markdown, summarize
from p6_served import serve_side

HERE = Path(__file__).resolve().parent
VARIANTS = ("prefix", "random", "prefix-direct", "random-direct", "prefix-noorder")
_WORDS = (
    "river stone light window garden market engine signal harbor lantern mountain letter pattern music silver "
    "forest number bridge machine winter summer island museum paper rocket planet history science ocean valley "
    "village castle desert library kitchen doctor teacher farmer pilot sailor painter student friend stranger "
    "morning evening shadow mirror thunder candle feather crystal meadow canyon glacier volcano comet orbit "
    "circuit network database compiler protocol archive ledger contract budget invoice report summary outline "
    "draft review answer question method reason result example detail record change order value system design "
    "careful quick gentle bright quiet ancient modern simple complex hidden open narrow broad steady rapid calm "
    "explain describe compare remember imagine consider measure collect arrange follow write read build carry"
)
WORDS = _WORDS.split()

# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_file(path: Path, variant: str, a: argparse.Namespace, model: str, seed: int) -> None:
    """`a.n` chat lines: over `a.groups` shared system prompts (prefix variants), shuffled, or each with its own."""
    rng = random.Random(seed)
    shared = variant.startswith("prefix")
    systems = [f"You are assistant {g}. Notes: {words(rng, a.prefix_words)}" for g in range(a.groups)]
    lines = []
    for i in range(a.n):
        system = (
            systems[i % a.groups] if shared else f"You are assistant {i}. Notes: {words(rng, a.prefix_words)}"
        )
        body = {
            "model": model,
            "max_tokens": a.max_tokens,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question {i}: {words(rng, a.question_words)}?"},
            ],
        }
        lines.append(
            {"custom_id": f"{variant}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_inputs(a: argparse.Namespace, wd: Path, model: str) -> dict[str, Path]:
    files = {}
    for k, v in enumerate(a.variants):
        files[v] = wd / f"{v}.jsonl"
        make_file(files[v], v, a, model, a.seed + 1000 * k)
    # the server's warm-up: as many requests as will be in flight, prompts of the same length (its continuous
    # batching captures CUDA graphs per batch shape as they come; generate_batch captures them before it starts),
    # none shared with a measured file
    warm = wd / "warmup.jsonl"
    wa = argparse.Namespace(**{**vars(a), "n": min(a.concurrency, a.n), "max_tokens": 16})
    make_file(warm, "warmup", wa, model, a.seed + 99)
    files["warmup"] = warm
    with open(wd / "corpus.txt", "w") as fh:  # what the tokenizer is trained on
        fh.write("<|system|>\n<|user|>\n<|assistant|>\n")
        for f in files.values():
            for line in f.read_text().splitlines():
                for m in json.loads(line)["body"]["messages"]:
                    fh.write(m["content"] + "\n")
    return files


def build_phase(a: argparse.Namespace, wd: Path, procs: Procs, budget: Budget, m: dict[str, Any]) -> None:
    model = wd / "model"
    cmd = [
        a.tf_python,
        str(HERE / "tf_side.py"),
        "build",
        "--dir",
        str(model),
        "--corpus",
        str(wd / "corpus.txt"),
    ]
    cmd += ["--preset", "tiny" if a.dry_run else "gpu", *(["--cpu"] if a.device == "cpu" else [])]
    m["times"]["build_s"] = run_phase(procs, "build", cmd, wd / "build.log", budget.limit(a.build_s, "build"))
    m["build"] = json.loads((model / "p6-build.json").read_text())
    print(f"built in {m['times']['build_s']:.1f}s: {json.dumps(m['build'])}", flush=True)


def reference_phase(
    a: argparse.Namespace, wd: Path, files: dict[str, Path], procs: Procs, budget: Budget, m: dict[str, Any]
) -> None:
    """generate_batch over every variant's file in one process; a phase stopped at its limit keeps the files it
    finished (tf_side.py writes its result after each) and the served runs go on (the GPU is free again)."""
    result = wd / "reference.json"
    cmd = [a.tf_python, str(HERE / "tf_side.py"), "reference", "--dir", str(wd / "model")]
    cmd += ["--max-tokens", str(a.max_tokens), "--result", str(result), "--device", a.device, *cb_flags(a)]
    cmd += [str(files[v]) for v in a.variants]
    try:
        limit = budget.limit(a.reference_s, "reference")
        m["times"]["reference_s"] = run_phase(procs, "reference", cmd, wd / "reference.log", limit)
    except PhaseError as e:
        m["errors"].append(brief(e))
        print(f"ERROR {e}", flush=True)
    with contextlib.suppress(OSError, ValueError):
        m["ref"] = json.loads(result.read_text())


# ------------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny model on the CPU, few lines: checks the path"
    )
    ap.add_argument("--out", help="where the JSON and markdown results go (default $OUT, else the work dir)")
    ap.add_argument("--workdir", help="inputs, model, logs (default: a new temp dir)")
    ap.add_argument("--n", type=int, help="lines a file (default 1000; --dry-run 8)")
    ap.add_argument(
        "--max-tokens", type=int, help="tokens generated by every request (default 128; --dry-run 8)"
    )
    ap.add_argument("--groups", type=int, default=8, help="shared system prompts in the prefix files")
    ap.add_argument(
        "--prefix-words", type=int, help="words a system prompt (~tokens; default 600; --dry-run 40)"
    )
    ap.add_argument("--question-words", type=int, default=20)
    ap.add_argument(
        "--concurrency",
        type=int,
        help="requests in flight, batchyard and direct (default 1000: a whole file, as generate_batch has it)",
    )
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, in order; of {VARIANTS}"
    )
    ap.add_argument(
        "--tf-python", default=sys.executable, help="the python with torch + transformers[serving]"
    )
    ap.add_argument("--device", help="transformers serve --device (default cuda:0; --dry-run cpu)")
    ap.add_argument("--budget-s", type=float, help="overall limit (default 420; --dry-run 170)")
    ap.add_argument("--build-s", type=float, default=150)
    ap.add_argument("--reference-s", type=float, default=200)
    ap.add_argument("--serve-start-s", type=float, default=150)
    ap.add_argument("--seed", type=int, default=1234)
    for opt in ("--cb-block-size", "--cb-num-blocks", "--cb-max-batch-tokens"):
        ap.add_argument(opt, type=int, help="continuous batching, both sides (default: transformers' own)")
    ap.add_argument("--cb-max-memory-percent", type=float)
    ap.add_argument("--batchyard-arg", action="append", default=[], help="more `batchyard serve` options")
    a = ap.parse_args(argv)
    dry = a.dry_run
    for k, gpu, cpu in (
        ("n", 1000, 8),
        ("max_tokens", 128, 8),
        ("prefix_words", 600, 40),
        ("concurrency", 1000, 4),
        ("device", "cuda:0", "cpu"),
        ("budget_s", 420.0, 170.0),
    ):
        if getattr(a, k) is None:
            setattr(a, k, cpu if dry else gpu)
    if dry:  # a small paged cache: transformers sizes it from the machine's memory otherwise (slow on a CPU)
        for k, v in (("cb_block_size", 32), ("cb_num_blocks", 256), ("cb_max_batch_tokens", 512)):
            if getattr(a, k) is None:
                setattr(a, k, v)
    a.variants = [v for v in a.variants.split(",") if v]
    if bad := [v for v in a.variants if v not in VARIANTS]:
        ap.error(f"unknown variants {bad}")
    return a


def measure(a: argparse.Namespace, wd: Path, procs: Procs, budget: Budget) -> dict[str, Any]:
    """Every phase in turn; whatever stops one, what was measured before it is kept."""
    m: dict[str, Any] = {"build": {}, "ref": {}, "served": {}, "times": {}, "errors": []}
    try:
        files = write_inputs(a, wd, str(wd / "model"))
        build_phase(a, wd, procs, budget, m)
        reference_phase(a, wd, files, procs, budget, m)
        m["served"] = serve_side(a, wd, files, procs, budget, m["ref"])
        m["errors"] += m["served"].get("errors", [])
    except Exception as e:  # the summary still says what was measured before it
        m["errors"].append(brief(e) if isinstance(e, PhaseError) else f"{type(e).__name__}: {brief(e)}")
        print(f"ERROR {e}", flush=True)
    finally:
        procs.stop_all()
    return m


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    budget = Budget(a.budget_s)
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="p6tf-"))
    wd.mkdir(parents=True, exist_ok=True)
    out = Path(a.out or os.environ.get("OUT") or wd)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(
        f"P6 transformers: work dir {wd}, results to {out}, budget {a.budget_s:.0f}s, variants {a.variants}"
    )
    m = measure(a, wd, Procs(), budget)
    if out.resolve() != wd.resolve():  # the logs travel with the results ($OUT on the GPU machine)
        for log in ("build.log", "reference.log", "transformers-serve.log", "batchyard.log"):
            with contextlib.suppress(OSError):
                shutil.copyfile(wd / log, out / f"p6-{log}")
    summary = summarize(a, wd, m, m["errors"], budget.total - budget.left())
    md = markdown(a, summary)
    (out / "p6_transformers.md").write_text(md)
    line = json.dumps(summary)
    (out / "p6_transformers.json").write_text(line + "\n")
    print("\n" + md)
    print(line)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
