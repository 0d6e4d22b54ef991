"""P6 (GPU): `vllm serve` + batchyard against `vllm run-batch` on the same model and the same input file.

    python bench/gpu/p6_vllm.py [--model Qwen/Qwen2.5-0.5B-Instruct] [--n 2000] [--max-tokens 256]
    python bench/gpu/p6_vllm.py --dry-run      # no GPU, no vLLM: writes the input, prints the commands

Stages, in this order, each with its own time budget inside an overall one (default 540 s):

1. `vllm serve MODEL` until GET /health answers 200 (cold load; reported, not counted).
2. `batchyard serve --upstream http://127.0.0.1:P/v1 --concurrency C`; upload the input with the openai SDK
   (reported, not counted); time batch create -> status `completed`; download the output (and error) file.
3. Stop both servers and wait until every process of theirs has exited (GPU memory released).
4. `vllm run-batch -i input.jsonl -o ref-out.jsonl --model MODEL` (or `python -m ...run_batch` on older vLLM),
   timed from process start to the output file being written and to process exit; both include the model load.
5. `vllm serve MODEL` again until /health is 200: the model load estimate for step 4, taken in the same cache state
   (weights in the page cache, torch.compile cache warm).

Output tokens/s = sum of `usage.completion_tokens` over the output lines, divided by
  reference: (start -> output written) - load estimate;   batchyard: batch create -> completed.
Both engines get the same engine arguments (--max-num-seqs, --max-num-batched-tokens, --max-model-len,
--gpu-memory-utilization, --engine-args). The last line printed is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

GOAL = 0.95

# Seconds per stage (each is also capped by what is left of --budget-s).
STAGE_BUDGETS = {
    "vllm serve (cold) -> /health": 240.0,
    "batchyard serve -> /health": 30.0,
    "upload": 30.0,
    "batch create -> completed": 240.0,
    "stop servers": 60.0,
    "vllm run-batch": 300.0,
    "vllm serve (warm) -> /health": 150.0,
}


class StageError(RuntimeError):
    pass


class StageTimeout(StageError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------------------

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a patient teacher. Explain ideas step by step, define every technical term the first time you use "
    "it, use a concrete example for each idea, and finish with a two-sentence summary.",
    "You are a senior software engineer reviewing code and designs. Be precise and concrete, prefer examples to "
    "abstractions, point out edge cases, and say which trade-offs you would accept and why.",
    "You write for a popular-science magazine. House style: short paragraphs, no jargon without an explanation, "
    "active voice, British spelling, numbers under ten written out, no bullet lists unless the reader asked "
    "for a list, a vivid opening sentence, and a closing line that connects the topic to everyday life. Avoid "
    "hype and superlatives; when a claim is uncertain, say how certain it is. Prefer one well-developed example "
    "to three shallow ones. Do not address the reader as 'you' more than twice. Never invent quotations, "
    "statistics or sources; if a figure would help, describe its order of magnitude instead. Keep the tone warm "
    "but not chatty, and end every answer with a one-sentence takeaway in italics.",
]

TOPICS = [
    "photosynthesis",
    "plate tectonics",
    "the French Revolution",
    "public-key cryptography",
    "black holes",
    "the immune system",
    "supply and demand",
    "the printing press",
    "neural networks",
    "ocean currents",
    "the Roman road network",
    "antibiotic resistance",
    "the TCP handshake",
    "jazz improvisation",
    "compound interest",
    "volcanoes",
    "the history of tea",
    "garbage collection in programming languages",
    "bird migration",
    "the water cycle",
    "quantum entanglement",
    "medieval castles",
    "solar panels",
    "the Silk Road",
    "sourdough fermentation",
    "database indexes",
    "glaciers",
    "the Apollo program",
    "coral reefs",
    "the Byzantine Empire",
    "electric cars",
    "sleep and memory",
    "the metric system",
    "honeybee colonies",
    "container shipping",
    "the Renaissance",
    "hash tables",
    "monsoons",
    "chess openings",
    "the invention of the telephone",
]
AUDIENCES = [
    "a ten-year-old",
    "a first-year university student",
    "a busy manager",
    "a retired engineer",
    "a high-school class",
    "a journalist",
    "a new employee",
    "a curious grandparent",
]
PLACES = [
    "a lighthouse on a stormy coast",
    "a night market in Taipei",
    "a research station in Antarctica",
    "a small Alpine village",
    "a space station",
    "a busy hospital",
    "a desert caravan",
    "an old library",
]
CODE_TASKS = [
    "merges two sorted lists",
    "parses an ISO 8601 date without libraries",
    "finds the longest palindrome in a string",
    "implements an LRU cache",
    "computes the edit distance of two strings",
    "validates a Sudoku board",
    "flattens a nested dictionary",
    "rate-limits calls with a token bucket",
    "computes running medians of a stream",
    "topologically sorts a dependency graph",
]
TEMPLATES = [
    "Explain {topic} to {audience}. Cover the history, the key ideas and one common misconception.",
    "Write a short story set in {place} in which a character discovers something surprising about {topic}.",
    "List {k} facts about {topic}, with two sentences on each.",
    "Compare {topic} with {topic2}: similarities, differences, and where each matters in practice.",
    "Write a Python function that {code}. Then explain how it works, line by line.",
    "Draft an email to {audience} announcing a workshop on {topic} held in {place}. Include an agenda.",
    "Summarize these notes and propose three next steps:\n{notes}",
    "Give a step-by-step plan for learning about {topic} in {k} weeks, with one exercise per week.",
    "Write a dialogue between {audience} and an expert about {topic}.",
    "What would change in the world if {topic} had never been discovered or invented? Argue both sides.",
]
TONES = ["formal", "playful", "neutral", "enthusiastic", "skeptical", "poetic", "dry", "friendly"]
EXTRAS = [
    "",
    " Use a {tone} tone.",
    " Mention {topic2} at least once.",
    " Start with a question and end with a surprising fact.",
    " Give at least {k} concrete examples.",
    " Write it as numbered sections with headings.",
    " Include a short analogy involving {place}.",
    " Assume the reader is {audience}.",
]
WORDS = [
    "budget",
    "deadline",
    "vendor",
    "migration",
    "rollout",
    "customer",
    "survey",
    "feedback",
    "latency",
    "outage",
    "review",
    "hiring",
    "roadmap",
    "prototype",
    "pilot",
    "contract",
    "audit",
    "backlog",
    "sprint",
    "metrics",
    "dashboard",
    "training",
    "onboarding",
    "invoice",
    "inventory",
    "forecast",
    "risk",
    "mitigation",
    "stakeholder",
    "launch",
    "regression",
    "benchmark",
    "capacity",
    "staffing",
    "offsite",
    "quarterly",
]


def make_messages(rng: random.Random) -> list[dict[str, str]]:
    topic, topic2 = rng.sample(TOPICS, 2)
    notes = "\n".join(
        "- " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        for _ in range(rng.randint(3, 12))
    )
    user = (rng.choice(TEMPLATES) + rng.choice(EXTRAS)).format(
        topic=topic,
        topic2=topic2,
        audience=rng.choice(AUDIENCES),
        place=rng.choice(PLACES),
        code=rng.choice(CODE_TASKS),
        tone=rng.choice(TONES),
        k=rng.randint(3, 9),
        notes=notes,
    )
    msgs: list[dict[str, str]] = []
    if (
        rng.random() >= 0.1
    ):  # 90 % share one of four system prompts (prefix caching applies to both runs alike)
        msgs.append({"role": "system", "content": SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]})
    if rng.random() < 0.15:  # some multi-turn conversations
        msgs += [
            {"role": "user", "content": f"Tell me briefly what {topic} is."},
            {
                "role": "assistant",
                "content": f"Sure. In one sentence: {topic} is a subject with a long history "
                "and several ideas worth knowing. Ask me anything about it.",
            },
            {"role": "user", "content": "Now go deeper. " + user},
        ]
    else:
        msgs.append({"role": "user", "content": user})
    return msgs


def make_input(path: Path, n: int, model: str, max_tokens: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    users: set[str] = set()
    with open(path, "w") as fh:
        for i in range(n):
            messages = make_messages(rng)
            users.add(messages[-1]["content"])
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            line = {"custom_id": f"p6-{i:06d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            fh.write(json.dumps(line) + "\n")
    return {"lines": n, "bytes": path.stat().st_size, "distinct_user_prompts": len(users)}


# --------------------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------------------

LIVE: list[subprocess.Popen[bytes]] = []
# Processes seen under each started one: a child that leaves the process group and outlives its parent is
# still found (and killed) after the parent has exited.
SEEN: dict[int, set[int]] = {}
NAMES: dict[int, str] = {}


def _procs() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgrp, state) of every process, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out.append((int(d.name), int(f[1]), int(f[2]), f[0]))
    return out


def _tree(root: int, known: set[int]) -> set[int]:
    """Live (non-zombie) processes in root's process group, or descending from root or from `known`."""
    procs = _procs()
    kids: dict[int, list[int]] = {}
    for pid, ppid, _, _ in procs:
        kids.setdefault(ppid, []).append(pid)
    found = {root, *known}
    todo = list(found)
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return {pid for pid, _, pgrp, state in procs if state != "Z" and (pid in found or pgrp == root)}


def kill_tree(proc: subprocess.Popen[bytes], grace: float = 20.0) -> bool:
    """SIGTERM the process group (and descendants that left it), SIGKILL after `grace`; True once all are gone."""
    members = _tree(proc.pid, SEEN.get(proc.pid, set()))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        members = _tree(proc.pid, members)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
            members = _tree(proc.pid, members)
            if proc.returncode is not None and not members:
                if proc in LIVE:
                    LIVE.remove(proc)
                return True
            if time.monotonic() > deadline:
                break
    return False


def track(proc: subprocess.Popen[bytes]) -> None:
    SEEN[proc.pid] = _tree(proc.pid, SEEN.get(proc.pid, set()))


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    LIVE.append(proc)
    NAMES[proc.pid] = log.name
    return proc


def cleanup() -> None:
    for proc in list(LIVE):
        kill_tree(proc, grace=10.0)


def tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + s[-300:] for s in text[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Budget:
    def __init__(self, total: float) -> None:
        self.total = total
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def stage(self, name: str) -> tuple[float, float]:
        """(deadline as time.monotonic(), seconds allowed) for a stage."""
        allowed = min(STAGE_BUDGETS[name], self.left())
        if allowed < 5:
            raise StageTimeout(f"stage '{name}': the overall budget of {self.total:.0f}s is spent")
        return time.monotonic() + allowed, allowed


def http_get(url: str, timeout: float = 2.0) -> str | None:
    """The body of a 200 answer, else None."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode(errors="replace") if r.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None


class MetricsWatch(threading.Thread):
    """Polls a vLLM Prometheus /metrics endpoint: when the engine first has work, when its token count last moved.

    Times are seconds since `t0` (time.perf_counter()). Polls every 0.1 s until the engine has work, then every
    `then` seconds (0: stop polling), to keep its cost to the measured process small.
    """

    def __init__(self, url: str, t0: float, then: float) -> None:
        super().__init__(daemon=True)
        self.url, self.t0, self.then = url, t0, then
        self.first: float | None = None
        self.last_change: float | None = None
        self.tokens = -1.0
        self.halt = threading.Event()

    @staticmethod
    def value(text: str, name: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                with contextlib.suppress(ValueError, IndexError):
                    total += float(line.rsplit(None, 1)[1])
        return total

    def run(self) -> None:
        while not self.halt.is_set():
            text = http_get(self.url, timeout=1.0)
            now = time.perf_counter() - self.t0
            if text is not None:
                busy = self.value(text, "vllm:num_requests_running") + self.value(
                    text, "vllm:num_requests_waiting"
                )
                tokens = self.value(text, "vllm:generation_tokens_total")
                if self.first is None and (busy > 0 or tokens > 0):
                    self.first = now
                if tokens != self.tokens:
                    self.tokens, self.last_change = tokens, now
            if self.first is not None and self.then <= 0:
                return
            self.halt.wait(0.1 if self.first is None else self.then)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def http_ok(url: str) -> bool:
    return http_get(url) is not None


def start_healthy(
    name: str, cmd: list[str], log: Path, env: dict[str, str], url: str, budget: Budget
) -> tuple[subprocess.Popen[bytes], float]:
    """Starts `cmd`; returns it and the seconds from its start until `url` answered 200. Raises if it exits first
    or the stage's budget runs out (the process is then left to the caller's cleanup)."""
    deadline, allowed = budget.stage(name)
    t0 = time.perf_counter()
    proc = spawn(cmd, log, env)
    i = 0
    while True:
        if http_ok(url):
            return proc, time.perf_counter() - t0
        i += 1
        if i % 10 == 0:
            track(proc)
        if proc.poll() is not None:
            raise StageError(
                f"stage '{name}': the process exited with code {proc.returncode}; log {log}:\n{tail(log)}"
            )
        if time.monotonic() > deadline:
            raise StageTimeout(
                f"stage '{name}' exceeded its budget of {allowed:.0f}s; log {log}:\n{tail(log)}"
            )
        time.sleep(0.1)


def stop_all(budget: Budget) -> list[str]:
    """Stops every process tree started so far; returns the logs of those that did not exit."""
    grace = max(5.0, min(STAGE_BUDGETS["stop servers"], budget.left()) - 10)
    return [NAMES.get(p.pid, str(p.pid)) for p in list(LIVE) if not kill_tree(p, grace=grace)]


# --------------------------------------------------------------------------------------------------------------
# vLLM and batchyard commands
# --------------------------------------------------------------------------------------------------------------

PROBE = r"""
import importlib.metadata, importlib.util, json, os, sys
model = sys.argv[1]
out = {"python": sys.executable, "found": False}
spec = importlib.util.find_spec("vllm")
if spec is not None and spec.submodule_search_locations:
    d = list(spec.submodule_search_locations)[0]
    out.update(found=True, dir=d)
    try:
        out["version"] = importlib.metadata.version("vllm")
    except Exception:
        out["version"] = "?"
    ep = os.path.join(d, "entrypoints")
    out["cli_main"] = os.path.exists(os.path.join(ep, "cli", "main.py"))
    out["cli_run_batch"] = os.path.exists(os.path.join(ep, "cli", "run_batch.py"))
    out["run_batch_modules"] = [m for m in ("openai", "launchers")
                                if os.path.exists(os.path.join(ep, m, "run_batch.py"))]
    out["run_batch_metrics"] = False
    for m in out["run_batch_modules"]:
        with open(os.path.join(ep, m, "run_batch.py"), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
            out["run_batch_metrics"] |= "enable_metrics" in text or "enable-metrics" in text
    enable = disable = False
    for sub in ("entrypoints", "engine"):
        for root, _dirs, files in os.walk(os.path.join(d, sub)):
            for f in files:
                if f.endswith(".py"):
                    try:
                        text = open(os.path.join(root, f), encoding="utf-8", errors="replace").read()
                    except OSError:
                        continue
                    enable = enable or "enable_log_requests" in text
                    disable = disable or "disable_log_requests" in text
    # Old vLLM logged every request in `serve` unless told not to; run-batch never does.
    out["needs_disable_log_requests"] = disable and not enable
if os.path.isdir(model):
    out["model_cached"] = True
    out["model_local"] = True
else:
    out["model_local"] = False
    try:
        from huggingface_hub import try_to_load_from_cache
        p = try_to_load_from_cache(model, "config.json")
        snap = os.path.dirname(p) if isinstance(p, str) else None
        out["model_cached"] = bool(snap) and any(
            f.endswith((".safetensors", ".bin")) for f in os.listdir(snap))
        out["model_snapshot"] = snap
    except Exception as e:
        out["model_cached"] = False
        out["cache_error"] = repr(e)
print(json.dumps(out))
"""


class Commands:
    def __init__(self, a: argparse.Namespace, wd: Path) -> None:
        self.a = a
        self.wd = wd
        self.vllm_bin = a.vllm_bin or _sibling_or_path("vllm")
        self.vllm_python = _interpreter_of(self.vllm_bin) if self.vllm_bin else sys.executable
        self.probe: dict[str, Any] = {"found": False}
        if a.batchyard_bin:
            self.batchyard = shlex.split(a.batchyard_bin)
        elif by := _sibling_or_path("batchyard"):
            self.batchyard = [by]
        else:
            self.batchyard = [sys.executable, "-m", "batchyard.cli.main"]

    def run_probe(self) -> None:
        """Where vLLM is, its version and CLI shape, and whether the model is on disk; imports neither."""
        try:
            r = subprocess.run(
                [self.vllm_python, "-c", PROBE, self.a.model], capture_output=True, text=True, timeout=60
            )
        except (subprocess.TimeoutExpired, OSError) as e:
            self.probe = {"found": False, "error": repr(e)}
            return
        try:
            self.probe = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.probe = {"found": False, "error": (r.stdout + r.stderr)[-2000:]}

    def offline(self) -> bool:
        if self.a.offline == "auto":
            return bool(self.probe.get("model_cached"))
        return self.a.offline == "on"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
        env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        if self.offline():
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return env

    def engine_args(self) -> list[str]:
        a = self.a
        args = [
            "--max-num-seqs", str(a.max_num_seqs),
            "--gpu-memory-utilization", str(a.gpu_memory_utilization),
        ]  # fmt: skip
        if a.max_model_len:
            args += ["--max-model-len", str(a.max_model_len)]
        if a.max_num_batched_tokens:
            # vLLM's default differs between `serve` and `run-batch` (usage context), so pin it.
            args += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
        return args + shlex.split(a.engine_args)

    def serve(self, port: int) -> list[str]:
        if self.vllm_bin:
            head = [self.vllm_bin, "serve", self.a.model]
        elif self.probe.get("cli_main"):
            head = [self.vllm_python, "-m", "vllm.entrypoints.cli.main", "serve", self.a.model]
        else:
            head = [self.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.a.model]
        extra = ["--disable-log-requests"] if self.probe.get("needs_disable_log_requests") else []
        return [*head, "--host", "127.0.0.1", "--port", str(port), *self.engine_args(), *extra]

    def run_batch(self, inp: Path, out: Path, metrics_port: int | None) -> list[str]:
        mods = self.probe.get("run_batch_modules") or ["openai"]
        if self.vllm_bin and (self.probe.get("cli_run_batch") or not self.probe.get("found")):
            head = [self.vllm_bin, "run-batch"]
        elif self.probe.get("cli_main") and self.probe.get("cli_run_batch"):
            head = [self.vllm_python, "-m", "vllm.entrypoints.cli.main", "run-batch"]
        else:  # vLLM from before the `run-batch` subcommand
            head = [self.vllm_python, "-m", f"vllm.entrypoints.{mods[0]}.run_batch"]
        # Its Prometheus endpoint (a thread of the same process) tells when the engine gets its first request.
        metrics = ["--enable-metrics", "--port", str(metrics_port)] if metrics_port else []
        return [*head, "-i", str(inp), "-o", str(out), "--model", self.a.model, *metrics, *self.engine_args()]

    def ref_metrics(self) -> bool:
        return self.a.ref_metrics and bool(self.probe.get("run_batch_metrics") or not self.probe.get("found"))

    def batchyard_serve(self, port: int, vllm_port: int) -> list[str]:
        cmd = [
            *self.batchyard, "serve",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--upstream", f"http://127.0.0.1:{vllm_port}/v1",
            "--concurrency", str(self.a.concurrency),
            "--data-dir", str(self.wd / "batchyard-data"),
            "--log-level", "warning",
        ]  # fmt: skip
        if self.a.n > 50_000:
            cmd += ["--max-lines", str(self.a.n)]
        return cmd + shlex.split(self.a.batchyard_args)


def _interpreter_of(script: str) -> str:
    """The python a console script runs under (its #! line), else the one running this file."""
    with contextlib.suppress(OSError, UnicodeDecodeError), open(script, "rb") as fh:
        first = fh.readline(4096).decode()
        if first.startswith("#!"):
            parts = first[2:].split()
            if parts and os.path.basename(parts[0]) == "env" and len(parts) > 1:
                parts = [shutil.which(parts[1]) or ""]
            if parts and os.path.basename(parts[0]).startswith("python") and os.access(parts[0], os.X_OK):
                return parts[0]
    return sys.executable


def _sibling_or_path(name: str) -> str | None:
    # Not resolved: a venv's python is a symlink, and its scripts sit next to the link.
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def gpu_info() -> str:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StageError(f"nvidia-smi failed ({e!r}): this benchmark needs an NVIDIA GPU") from e
    if r.returncode != 0:
        raise StageError(f"nvidia-smi failed: {r.stderr.strip()}")
    return r.stdout.strip().replace("\n", " | ")


def gpu_busy() -> str:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        r = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return r.stdout.strip()
    return ""


# --------------------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------------------


def read_outputs(paths: list[Path], expected: set[str]) -> dict[str, Any]:
    seen: dict[str, int] = {}
    lines = errors = tokens = 0
    for p in paths:
        if not p.exists():
            continue
        with open(p) as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                lines += 1
                try:
                    rec = json.loads(raw)
                except ValueError:
                    errors += 1
                    continue
                cid = rec.get("custom_id")
                seen[cid] = seen.get(cid, 0) + 1
                resp = rec.get("response") or {}
                body = resp.get("body") or {}
                usage = body.get("usage") if isinstance(body, dict) else None
                if rec.get("error") or resp.get("status_code") != 200 or not usage:
                    errors += 1
                    continue
                tokens += int(usage.get("completion_tokens") or 0)
    dup = sum(1 for c in seen.values() if c > 1)
    missing = len(expected - seen.keys())
    unexpected = len(seen.keys() - expected)
    ok = lines == len(expected) and not dup and not missing and not unexpected and not errors
    return {
        "lines": lines,
        "errors": errors,
        "duplicates": dup,
        "missing": missing,
        "unexpected": unexpected,
        "completion_tokens": tokens,
        "ok": ok,
    }


def describe(name: str, r: dict[str, Any], n: int) -> str:
    verdict = "OK" if r["ok"] else "FAIL"
    return (
        f"  {name} output lines: {r['lines']} of {n} expected [{verdict}] (error lines {r['errors']}, "
        f"duplicate custom_ids {r['duplicates']}, missing {r['missing']}, unexpected {r['unexpected']}); "
        f"completion tokens {r['completion_tokens']:,}"
    )


PBAR = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def pbar_elapsed(log: Path) -> float | None:
    """Elapsed time on run-batch's last full progress bar (starts once every request is submitted; 1 s grain)."""
    best = None
    with contextlib.suppress(OSError):
        for m in PBAR.finditer(log.read_text(errors="replace")):
            if m.group(1) == m.group(2):
                best = int(m.group(3) or 0) * 3600 + int(m.group(4)) * 60 + int(m.group(5))
    return best


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------


def phase_batchyard(cmds: Commands, wd: Path, inp: Path, budget: Budget, res: dict[str, Any]) -> None:
    from openai import OpenAI

    env = cmds.env()
    vport, bport = free_port(), free_port()
    vlog, blog = wd / "vllm-serve-cold.log", wd / "batchyard.log"
    try:
        print(f"[1] vllm serve (cold) on :{vport}; log {vlog}", flush=True)
        _, res["serve_load_cold_s"] = start_healthy(
            "vllm serve (cold) -> /health",
            cmds.serve(vport),
            vlog,
            env,
            f"http://127.0.0.1:{vport}/health",
            budget,
        )
        print(f"    healthy after {res['serve_load_cold_s']:.1f}s", flush=True)

        print(f"[2] batchyard serve on :{bport} -> vLLM :{vport}; log {blog}", flush=True)
        start_healthy(
            "batchyard serve -> /health",
            cmds.batchyard_serve(bport, vport),
            blog,
            env,
            f"http://127.0.0.1:{bport}/health",
            budget,
        )

        client = OpenAI(base_url=f"http://127.0.0.1:{bport}/v1", api_key="bench", max_retries=2, timeout=60)
        deadline, allowed = budget.stage("upload")
        t0 = time.perf_counter()
        with open(inp, "rb") as fh:
            f = client.files.create(file=("input.jsonl", fh), purpose="batch")
        res["by_upload_s"] = time.perf_counter() - t0
        if time.monotonic() > deadline:
            raise StageTimeout(f"stage 'upload' exceeded its budget of {allowed:.0f}s")

        deadline, allowed = budget.stage("batch create -> completed")
        t0 = time.perf_counter()
        watch = MetricsWatch(f"http://127.0.0.1:{vport}/metrics", t0, then=1.0)
        watch.start()
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        last_print = t0
        try:
            while b.status not in ("completed", "failed", "expired", "cancelled"):
                if time.monotonic() > deadline:
                    with contextlib.suppress(Exception):
                        client.batches.cancel(b.id)
                    raise StageTimeout(
                        f"stage 'batch create -> completed' exceeded its budget of {allowed:.0f}s "
                        f"(status {b.status}, counts {b.request_counts}); logs {blog}, {vlog}"
                    )
                time.sleep(0.1)
                b = client.batches.retrieve(b.id)
                if time.perf_counter() - last_print > 10:
                    last_print = time.perf_counter()
                    rc = b.request_counts
                    done = f"{rc.completed} done, {rc.failed} failed of {rc.total}" if rc else "?"
                    print(f"    {last_print - t0:5.0f}s {b.status}: {done}", flush=True)
            res["by_batch_s"] = time.perf_counter() - t0
        finally:
            watch.stop()
        res["by_engine_first_s"], res["by_engine_last_s"] = watch.first, watch.last_change
        print(f"    batch {b.id} {b.status} after {res['by_batch_s']:.1f}s", flush=True)
        if b.status != "completed":
            raise StageError(f"batch ended {b.status}: {b.errors}; log {blog}:\n{tail(blog)}")
        out, err = wd / "batchyard-out.jsonl", wd / "batchyard-errors.jsonl"
        if b.output_file_id:
            out.write_bytes(client.files.content(b.output_file_id).content)
        if b.error_file_id:
            err.write_bytes(client.files.content(b.error_file_id).content)
        res["by_files"] = [out, err]
    finally:
        print("[3] stopping batchyard and vllm serve", flush=True)
        stuck = stop_all(budget)
    if stuck:
        raise StageError(f"processes of {', '.join(stuck)} did not exit; the GPU may still be in use")


def phase_reference(cmds: Commands, wd: Path, inp: Path, budget: Budget, res: dict[str, Any]) -> None:
    out, log = wd / "ref-out.jsonl", wd / "vllm-run-batch.log"
    out.unlink(missing_ok=True)
    mport = free_port() if cmds.ref_metrics() else None
    deadline, allowed = budget.stage("vllm run-batch")
    print(f"[4] vllm run-batch; log {log}", flush=True)
    wall0 = time.time()
    t0 = time.perf_counter()
    proc = spawn(cmds.run_batch(inp, out, mport), log, cmds.env())
    watch = MetricsWatch(f"http://127.0.0.1:{mport}/metrics", t0, then=0) if mport else None
    if watch is not None:
        watch.start()
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise StageTimeout(
                    f"stage 'vllm run-batch' exceeded its budget of {allowed:.0f}s; log {log}:\n{tail(log)}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            track(proc)
        res["ref_exit_s"] = time.perf_counter() - t0
    finally:
        if watch is not None:
            watch.stop()
        kill_tree(proc, grace=15.0)
    if proc.returncode != 0 or not out.exists():
        raise StageError(f"vllm run-batch exited with code {proc.returncode}; log {log}:\n{tail(log)}")
    res["ref_written_s"] = out.stat().st_mtime - wall0
    res["ref_pbar_s"] = pbar_elapsed(log)
    res["ref_engine_first_s"] = watch.first if watch is not None else None
    res["ref_files"] = [out]
    print(
        f"    output written after {res['ref_written_s']:.1f}s, exited after {res['ref_exit_s']:.1f}s",
        flush=True,
    )


def phase_warm_load(cmds: Commands, wd: Path, budget: Budget, res: dict[str, Any]) -> None:
    port, log = free_port(), wd / "vllm-serve-warm.log"
    print(f"[5] vllm serve (warm) on :{port}, only to time the model load; log {log}", flush=True)
    try:
        _, res["serve_load_warm_s"] = start_healthy(
            "vllm serve (warm) -> /health",
            cmds.serve(port),
            log,
            cmds.env(),
            f"http://127.0.0.1:{port}/health",
            budget,
        )
        print(f"    healthy after {res['serve_load_warm_s']:.1f}s", flush=True)
    finally:
        stop_all(budget)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="Hugging Face id (weights in the HF cache, or an internet connection) or a local model directory",
    )
    ap.add_argument("--n", type=int, default=2000, help="chat requests in the input file")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument(
        "--seed", type=int, default=1234, help="seed of the prompt generator (sampling is greedy)"
    )
    ap.add_argument("--max-num-seqs", type=int, default=256, help="vLLM engine argument, both runs")
    ap.add_argument(
        "--gpu-memory-utilization", type=float, default=0.90, help="vLLM engine argument, both runs"
    )
    ap.add_argument(
        "--max-model-len", type=int, default=4096, help="vLLM engine argument, both runs (0: vLLM's)"
    )
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="vLLM engine argument, both runs (0: vLLM's default, which differs between serve and run-batch)",
    )
    ap.add_argument("--engine-args", default="", help="more vLLM engine arguments for both runs, one string")
    ap.add_argument(
        "--concurrency", type=int, default=256, help="batchyard --concurrency (keep >= --max-num-seqs)"
    )
    ap.add_argument("--batchyard-args", default="", help="more `batchyard serve` options, one string")
    ap.add_argument(
        "--vllm-bin", default=None, help="the `vllm` executable [default: next to this python, or PATH]"
    )
    ap.add_argument(
        "--batchyard-bin", default=None, help="the `batchyard` command [default: next to this python]"
    )
    ap.add_argument(
        "--offline",
        choices=["auto", "on", "off"],
        default="auto",
        help="set HF_HUB_OFFLINE=1 for vLLM; auto: when the model is a local directory or fully in the HF cache",
    )
    ap.add_argument(
        "--no-ref-metrics",
        dest="ref_metrics",
        action="store_false",
        help="do not pass --enable-metrics to run-batch (it only serves the cross-check of its start time)",
    )
    ap.add_argument("--budget-s", type=float, default=540.0, help="overall time limit of the script")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="input, outputs and logs [default: a new temp dir]"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="write the input and print the commands; run nothing"
    )
    a = ap.parse_args()
    if a.n < 1 or a.max_tokens < 1:
        ap.error("--n and --max-tokens must be positive")
    return a


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def dry_run(a: argparse.Namespace, cmds: Commands, wd: Path, inp: Path) -> int:
    if not cmds.probe.get("found") and not cmds.vllm_bin:
        cmds.vllm_bin = "vllm"
        print(
            "(vLLM is not installed here: the commands below assume `vllm` on PATH, as after `pip install vllm`)"
        )
    vport, bport, mport = 8100, 8200, 8300
    print("\n--dry-run: these would run, in this order (ports are picked free at run time):")
    print(f"[1] {shlex.join(cmds.serve(vport))}")
    print(f"    until GET http://127.0.0.1:{vport}/health is 200 (cold load, reported, not counted)")
    print(f"[2] {shlex.join(cmds.batchyard_serve(bport, vport))}")
    print(
        f"    until GET http://127.0.0.1:{bport}/health is 200; then with the openai SDK: files.create({inp.name})"
    )
    print(
        "    (not counted), batches.create ... retrieve every 0.1 s until completed (counted), download output"
    )
    print(
        "[3] stop both: SIGTERM to each process group and descendant, SIGKILL after a grace period, wait until all exit"
    )
    print(
        f"[4] {shlex.join(cmds.run_batch(inp, wd / 'ref-out.jsonl', mport if cmds.ref_metrics() else None))}"
    )
    print("    timed from process start to output file written and to exit (both include the model load)")
    print(
        "    on vLLM without the run-batch subcommand: python -m vllm.entrypoints.openai.run_batch <same arguments>"
    )
    print(f"[5] {shlex.join(cmds.serve(vport))}")
    print("    until /health is 200: the model load estimate subtracted from [4]; then stopped")
    print(
        f"budget: {a.budget_s:.0f}s overall; per stage: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in STAGE_BUDGETS.items())
    )
    print(f"logs would go to {wd}/*.log")
    return 0


def main() -> int:
    a = parse_args()
    budget = Budget(a.budget_s)
    wd = a.workdir or Path(tempfile.mkdtemp(prefix="p6-vllm-"))
    wd.mkdir(parents=True, exist_ok=True)
    wd = wd.resolve()
    inp = wd / "input.jsonl"
    info = make_input(inp, a.n, a.model, a.max_tokens, a.seed)
    expected = {f"p6-{i:06d}" for i in range(a.n)}
    print(f"work dir: {wd}")
    print(
        f"input: {inp} ({info['lines']} chat requests, {info['bytes'] / 1e6:.2f} MB, "
        f"{info['distinct_user_prompts']} distinct final user messages, max_tokens {a.max_tokens}, temperature 0)"
    )
    cmds = Commands(a, wd)
    cmds.run_probe()
    p = cmds.probe
    if p.get("found"):
        print(f"vLLM {p.get('version')} at {p.get('dir')} (python {cmds.vllm_python})")
    else:
        why = (p.get("error") or "").strip()[-300:] or "not installed"
        print(f"vLLM: not found by {cmds.vllm_python} ({why})")
    print(f"batchyard: {shlex.join(cmds.batchyard)}")
    print(
        f"model: {a.model} (local directory or complete in the HF cache: {p.get('model_cached', 'unknown')}; "
        f"HF_HUB_OFFLINE for vLLM: {'on' if cmds.offline() else 'off'})"
    )
    if a.concurrency < a.max_num_seqs:
        print(
            f"warning: --concurrency {a.concurrency} < --max-num-seqs {a.max_num_seqs}: batchyard cannot fill the engine"
        )
    if a.dry_run:
        return dry_run(a, cmds, wd, inp)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    res: dict[str, Any] = {"vllm": p.get("version")}
    errors: list[str] = []
    warnings: list[str] = []
    try:
        res["gpu"] = gpu_info()
        print(f"GPU: {res['gpu']}")
        if busy := gpu_busy():
            print(f"warning: other processes use the GPU:\n{busy}")
        if not p.get("found") and not cmds.vllm_bin:
            raise StageError("vLLM is not installed for this python (pip install vllm) and no `vllm` on PATH")
        print(f"budget: {a.budget_s:.0f}s overall\n", flush=True)
        for phase, sink in (
            (lambda: phase_batchyard(cmds, wd, inp, budget, res), errors),
            (lambda: phase_reference(cmds, wd, inp, budget, res), errors),
            (lambda: phase_warm_load(cmds, wd, budget, res), warnings),
        ):
            try:
                phase()
            except StageError as e:
                sink.append(str(e).split("\n", 1)[0].rstrip(":"))
                print(f"{'ERROR' if sink is errors else 'WARNING'}: {e}", flush=True)
    except StageError as e:
        errors.append(str(e).split("\n", 1)[0].rstrip(":"))
        print(f"ERROR: {e}", flush=True)
    finally:
        cleanup()
    return report(a, wd, expected, res, errors, warnings, budget)


def report(
    a: argparse.Namespace,
    wd: Path,
    expected: set[str],
    res: dict[str, Any],
    errors: list[str],
    warnings: list[str],
    budget: Budget,
) -> int:
    n = a.n
    ref = read_outputs(res["ref_files"], expected) if "ref_files" in res else None
    by = read_outputs(res["by_files"], expected) if "by_files" in res else None

    load, load_from = res.get("serve_load_warm_s"), "warm"
    if load is None and "serve_load_cold_s" in res:
        load, load_from = res["serve_load_cold_s"], "cold"
        warnings.append(
            "model load estimate taken from the COLD vllm serve start (overestimates run-batch's load)"
        )
    ref_tok_s = ref_tok_s_exit = ref_gen_s = ref_tok_s_metrics = None
    ref_gen_metrics_s = None
    if ref is not None:
        if load is not None:
            ref_gen_s = res["ref_written_s"] - load
            if ref_gen_s > 0:
                ref_tok_s = ref["completion_tokens"] / ref_gen_s
            else:
                errors.append(f"load estimate {load:.1f}s >= run-batch time {res['ref_written_s']:.1f}s")
            if res["ref_exit_s"] - load > 0:
                ref_tok_s_exit = ref["completion_tokens"] / (res["ref_exit_s"] - load)
        if res.get("ref_engine_first_s") is not None:
            ref_gen_metrics_s = res["ref_written_s"] - res["ref_engine_first_s"]
            if ref_gen_metrics_s > 0:
                ref_tok_s_metrics = ref["completion_tokens"] / ref_gen_metrics_s
    by_tok_s = by["completion_tokens"] / res["by_batch_s"] if by is not None else None
    ratio = by_tok_s / ref_tok_s if by_tok_s and ref_tok_s else None
    ratio_metrics = by_tok_s / ref_tok_s_metrics if by_tok_s and ref_tok_s_metrics else None

    print(f"\n== P6: {a.model}, {n} chat requests, max_tokens {a.max_tokens}, temperature 0 ==")
    print(f"GPU: {res.get('gpu', '?')}; vLLM {res.get('vllm') or '?'}")
    print(
        f"engine args (both): --max-num-seqs {a.max_num_seqs} --gpu-memory-utilization {a.gpu_memory_utilization} "
        f"--max-model-len {a.max_model_len or 'default'} --max-num-batched-tokens {a.max_num_batched_tokens or 'default'} "
        f"{a.engine_args}".rstrip()
    )
    print(
        "\nreference: vllm run-batch (one process: model load, then every request, then write the output file)"
    )
    if ref is not None:
        print(describe("run-batch", ref, n))
        print(f"  process start -> exit (includes model load and shutdown):       {res['ref_exit_s']:7.1f} s")
        print(
            f"  process start -> output file written (includes model load):    {res['ref_written_s']:7.1f} s"
        )
        print(f"  model load estimate ({load_from} `vllm serve` start -> /health 200): {fmt(load, '7.1f')} s")
        print(f"  generation time = written - load estimate (counted):           {fmt(ref_gen_s, '7.1f')} s")
        print(f"  OUTPUT TOKENS/S, EXCLUDING MODEL LOAD:  {fmt(ref_tok_s, ',.0f')}")
        print(f"    (same, but counting up to process exit: {fmt(ref_tok_s_exit, ',.0f')})")
        if ref_gen_metrics_s is not None:
            print(
                f"    (cross-check: its /metrics first showed work {res['ref_engine_first_s']:.1f} s after start -> "
                f"{ref_gen_metrics_s:.1f} s to output written, {fmt(ref_tok_s_metrics, ',.0f')} tokens/s)"
            )
        if pb := res.get("ref_pbar_s"):
            print(
                f"    (cross-check: its progress bar says {pb:.0f} s from all requests submitted to all done, "
                f"{ref['completion_tokens'] / pb:,.0f} tokens/s, 1 s grain)"
            )
    else:
        print("  no result")
    print(f"\nbatchyard: vllm serve (same engine args) + batchyard serve --concurrency {a.concurrency}")
    print(
        f"  vllm serve cold start -> /health 200 (not counted):             {fmt(res.get('serve_load_cold_s'), '7.1f')} s"
    )
    print(
        f"  upload of the input file (not counted):                         {fmt(res.get('by_upload_s'), '7.1f')} s"
    )
    if by is not None:
        print(describe("batchyard", by, n))
        print(f"  batch create -> completed (engine already loaded; counted):     {res['by_batch_s']:7.1f} s")
        print(f"  OUTPUT TOKENS/S:                        {fmt(by_tok_s, ',.0f')}")
        first, last = res.get("by_engine_first_s"), res.get("by_engine_last_s")
        if first is not None and last is not None:
            print(
                f"    (vLLM /metrics: first work {first:.1f} s after create, token count last moved at "
                f"{last:.1f} s (1 s grain), completed at {res['by_batch_s']:.1f} s)"
            )
    else:
        print("  no result")
    goal_met = ratio is not None and ratio >= GOAL
    verdict = "n/a" if ratio is None else ("met" if goal_met else "NOT met")
    print(
        f"\nRATIO batchyard / reference, output tokens/s excluding model load: {fmt(ratio, '.3f')} "
        f"(goal >= {GOAL}: {verdict})"
    )
    if ratio_metrics is not None:
        print(f"  (with the reference timed from its first engine work instead: {ratio_metrics:.3f})")
    ok = not errors and ref is not None and ref["ok"] and by is not None and by["ok"]
    for w in warnings:
        print(f"warning: {w}")
    if errors:
        print("errors:\n  " + "\n  ".join(errors))
    print(f"work dir (input, outputs, logs): {wd}; the script took {budget.total - budget.left():.0f}s")

    def r(x: float | None, nd: int = 1) -> float | None:
        return None if x is None else round(x, nd)

    summary = {
        "bench": "p6_vllm",
        "date": dt.date.today().isoformat(),
        "gpu": res.get("gpu"),
        "vllm": res.get("vllm"),
        "model": a.model,
        "n": n,
        "max_tokens": a.max_tokens,
        "max_num_seqs": a.max_num_seqs,
        "max_num_batched_tokens": a.max_num_batched_tokens or None,
        "gpu_memory_utilization": a.gpu_memory_utilization,
        "concurrency": a.concurrency,
        "ref_lines": ref and ref["lines"],
        "ref_completion_tokens": ref and ref["completion_tokens"],
        "ref_exit_s": r(res.get("ref_exit_s")),
        "ref_written_s": r(res.get("ref_written_s")),
        "ref_load_est_s": r(load),
        "ref_load_est_from": load_from if load is not None else None,
        "ref_gen_s": r(ref_gen_s),
        "ref_tok_s": r(ref_tok_s, 0),
        "ref_tok_s_metrics": r(ref_tok_s_metrics, 0),
        "by_lines": by and by["lines"],
        "by_completion_tokens": by and by["completion_tokens"],
        "by_serve_load_cold_s": r(res.get("serve_load_cold_s")),
        "by_batch_s": r(res.get("by_batch_s")),
        "by_tok_s": r(by_tok_s, 0),
        "ratio": r(ratio, 3),
        "ratio_metrics": r(ratio_metrics, 3),
        "goal": GOAL,
        "goal_met": goal_met,
        "ok": ok,
        "errors": errors,
    }
    line = json.dumps(summary)
    (wd / "summary.json").write_text(line + "\n")
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
