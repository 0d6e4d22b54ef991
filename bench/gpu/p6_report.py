"""The P6 stand-in's results: one row per variant (the reference, the served run, their ratio), the markdown
table, the summary written as JSON."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

GOAL = 0.95  # P6's goal against vLLM's own batch runner, applied to this stand-in too


def rows(
    a: argparse.Namespace, ref: dict[str, Any], served: dict[str, Any], files: dict[str, Path]
) -> list[dict[str, Any]]:
    out = []
    for v in a.variants:
        r = (ref.get("files") or {}).get(files[v].name)
        s = (served.get("runs") or {}).get(v)
        row: dict[str, Any] = {"variant": v, "lines": a.n, "max_tokens": a.max_tokens}
        if r:
            row |= {
                "ref_prompt_tokens": r["prompt_tokens"],
                "ref_completion_tokens": r["completion_tokens"],
                "ref_gen_s": r["gen_s"],
                "ref_tok_s": r["tok_s"],
            }
        if s:
            tok_s = s["completion_tokens"] / s["wall_s"] if s["wall_s"] > 0 else None
            row |= {
                "served_prompt_tokens": s["prompt_tokens"],
                "served_completion_tokens": s["completion_tokens"],
                "served_wall_s": s["wall_s"],
                "served_tok_s": round(tok_s, 1) if tok_s else None,
                "served_ok_lines": s["ok_lines"],
                "served_error_lines": s["error_lines"],
            }
            if "create_to_completed_s" in s:
                row["create_to_completed_s"] = s["create_to_completed_s"]
                row["upload_s"] = s["upload_s"]
        if r and s:
            row["same_tokens"] = (
                r["prompt_tokens"] == s["prompt_tokens"] and r["completion_tokens"] == s["completion_tokens"]
            )
            row["ratio"] = (
                round(row["served_tok_s"] / r["tok_s"], 3) if row.get("served_tok_s") and r["tok_s"] else None
            )
            ok = s["ok_lines"] == a.n and not s["error_lines"] and s.get("each_id_once", True)
            ok = ok and s["all_max_tokens"] and r["all_max_tokens"]  # every request generated max_tokens
            row["ok"] = bool(ok and r["results"] == a.n and not r["failed"] and row["same_tokens"])
        out.append(row)
    by_name = {r["variant"]: r for r in out}
    for r in out:  # batchyard against the same engine driven directly: what batchyard itself costs
        d = by_name.get(r["variant"].split("-")[0] + "-direct")
        if d is not None and d is not r and r.get("served_tok_s") and d.get("served_tok_s"):
            r["ratio_vs_direct"] = round(r["served_tok_s"] / d["served_tok_s"], 3)
    return out


def markdown(a: argparse.Namespace, summary: dict[str, Any]) -> str:
    def f(x: Any, spec: str = "") -> str:
        return "—" if x is None else format(x, spec)

    head = (
        f"P6 (transformers stand-in), {summary['date']}, {summary.get('device') or '?'}, torch "
        f"{summary.get('torch') or '?'}, transformers {summary.get('transformers') or '?'} "
        f"(attention {summary.get('attn_implementation') or '?'}); model: "
        f"{summary.get('model_desc')}; {a.n} lines a file, max_tokens {a.max_tokens}, temperature 0, no EOS; "
        f"batchyard --concurrency {a.concurrency}{' (DRY RUN: tiny model on the CPU, not a measurement)' if a.dry_run else ''}"
    )
    lines = [
        head,
        "",
        "| variant | reference tok/s (gen s) | served: how | served tok/s (wall s) | ratio | vs direct | prompt / completion tokens | same tokens | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        how = (
            "direct to `transformers serve`"
            if r["variant"].endswith("-direct")
            else (
                "batchyard, upload→output"
                + (" (`--no-prefix-ordering`)" if r["variant"].endswith("-noorder") else "")
            )
        )
        lines.append(
            f"| {r['variant']} | {f(r.get('ref_tok_s'), ',.0f')} ({f(r.get('ref_gen_s'), '.2f')}) | {how} | "
            f"{f(r.get('served_tok_s'), ',.0f')} ({f(r.get('served_wall_s'), '.2f')}) | {f(r.get('ratio'), '.3f')} | "
            f"{f(r.get('ratio_vs_direct'), '.3f')} | "
            f"{f(r.get('ref_prompt_tokens'))} / {f(r.get('ref_completion_tokens'))} | {f(r.get('same_tokens'))} | "
            f"{f(r.get('ok'))} |"
        )
    if summary["errors"]:
        lines += ["", "Errors: " + "; ".join(summary["errors"])]
    return "\n".join(lines) + "\n"


def summarize(
    a: argparse.Namespace, wd: Path, m: dict[str, Any], errors: list[str], total_s: float
) -> dict[str, Any]:
    """The run's summary: what was built and measured (`m`: build, ref, served, times), one row per variant."""
    build, ref, served = m["build"], m["ref"], m["served"]
    files = {v: wd / f"{v}.jsonl" for v in a.variants}
    summary: dict[str, Any] = {
        "bench": "p6_transformers",
        "date": dt.date.today().isoformat(),
        "dry_run": a.dry_run,
        "device": ref.get("device"),
        "torch": ref.get("torch"),
        "transformers": ref.get("transformers"),
        "attn_implementation": ref.get("attn_implementation"),
        "model_desc": (
            f"Qwen2-shaped, {build['params'] / 1e6:.1f}M params, random weights, {build['dtype']}, tokenizer "
            f"vocab {build['vocab_tokenizer']} (model {build['vocab_model']})"
            if build
            else None
        ),
        "n": a.n,
        "max_tokens": a.max_tokens,
        "concurrency": a.concurrency,
        "cb": {k: getattr(a, k) for k in ("cb_block_size", "cb_num_blocks", "cb_max_batch_tokens")},
        "build": build,
        "reference_load_s": ref.get("load_s"),
        "phases_s": {k: round(v, 1) for k, v in m["times"].items()},
        "serve_start_s": served.get("serve_start_s"),
        "warmup": served.get("warmup"),
        "rows": rows(a, ref, served, files),
        "errors": errors,
        "total_s": round(total_s, 1),
        "goal": GOAL,
        "workdir": str(wd),
    }
    summary["ok"] = not errors and all(r.get("ok") for r in summary["rows"])
    return summary
