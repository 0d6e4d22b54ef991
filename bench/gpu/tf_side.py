"""The transformers side of P6 (`p6_transformers.py` runs it as a subprocess, under the python that has torch and
transformers): build a model with random weights and a tokenizer trained on the spot, then transformers' own
offline batch generation (`generate_batch`, continuous batching) on the same prompts batchyard will send.

    python bench/gpu/tf_side.py build --dir MODEL_DIR --preset gpu|tiny --corpus CORPUS.txt
    python bench/gpu/tf_side.py reference --dir MODEL_DIR --max-tokens M --result OUT.json IN1.jsonl [IN2.jsonl ...]

Nothing is downloaded: the configuration is written here (a Qwen2-shaped model), the weights are random, and the
tokenizer is a byte-level BPE trained with `tokenizers` on the prompts' own text. The model has no EOS token
(`eos_token_id` None, which continuous batching turns into -1), so every request generates exactly `max_tokens`
tokens on both sides (the random weights would otherwise stop at arbitrary points).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

# Qwen2.5-0.5B-Instruct's shape (494M parameters with its 151,936-token vocabulary), and a tiny one for --dry-run.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "dtype": "bfloat16",
        "tokenizer_vocab": 16384,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "dtype": "float32",
        "tokenizer_vocab": 2048,
    },
}

# The roles as plain text; content is a string or, as `transformers serve` passes it, a list of text parts.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    p = PRESETS[args.preset]
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=p["tokenizer_vocab"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    with open(args.corpus) as fh:
        tok.train_from_iterator(fh, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out)
    t_tok = time.perf_counter() - t0

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = getattr(torch, p["dtype"])
    cfg = Qwen2Config(
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        vocab_size=max(p["vocab_size"], tok.get_vocab_size()),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,  # no EOS: every request generates max_tokens tokens (ignore_eos, on both sides)
        pad_token_id=None,
        dtype=p["dtype"],
    )
    torch.manual_seed(args.seed)
    t1 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    params = sum(x.numel() for x in model.parameters())
    info = {
        "preset": args.preset,
        "params": params,
        "vocab_model": cfg.vocab_size,
        "vocab_tokenizer": tok.get_vocab_size(),
        "dtype": p["dtype"],
        "built_on": device,
        "tokenizer_s": round(t_tok, 2),
        "model_s": round(time.perf_counter() - t1, 2),
        "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }
    (out / "p6-build.json").write_text(json.dumps(info) + "\n")
    return info


def cb_config(args: argparse.Namespace) -> Any:
    from transformers import ContinuousBatchingConfig

    kw = {
        k: v
        for k, v in {
            "block_size": args.cb_block_size,
            "num_blocks": args.cb_num_blocks,
            "max_batch_tokens": args.cb_max_batch_tokens,
            "max_memory_percent": args.cb_max_memory_percent,
        }.items()
        if v is not None
    }
    return ContinuousBatchingConfig(**kw) if kw else None


def prompts_of(tokenizer: Any, path: Path) -> tuple[list[str], list[list[int]]]:
    """Each line's token ids, built as `transformers serve` builds them for /v1/chat/completions: content as text
    parts, the chat template with the generation prompt, tokenized by the same tokenizer files."""
    ids, inputs = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        msgs = [
            {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
            for m in rec["body"]["messages"]
        ]
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids.append(rec["custom_id"])
        inputs.append(list(enc["input_ids"]))
    return ids, inputs


def reference(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.dir)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype="auto", device_map=device)
    load_s = time.perf_counter() - t0
    gen = copy.deepcopy(model.generation_config)  # as `transformers serve` builds it for a request
    gen.max_new_tokens = args.max_tokens
    gen.do_sample = False  # temperature 0
    gen.use_cache = False  # continuous batching keeps its own paged cache
    res: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "load_s": round(load_s, 2),
        "files": {},
    }
    cbc = cb_config(args)
    for name in args.inputs:
        path = Path(name)
        custom_ids, inputs = prompts_of(tokenizer, path)
        t1 = time.perf_counter()
        # transformers' own offline batch API; the manager persists across files (as the server's does) so that
        # only the first file pays its warm-up; each file has its own prompts, so no file finds another's cached.
        out = model.generate_batch(
            inputs=inputs,
            generation_config=gen,
            continuous_batching_config=cbc,
            persistent_manager=True,
        )
        call_s = time.perf_counter() - t1
        outs = list(out.values())
        # generation time: from the first request's arrival (after the warm-up) to the last one's end
        start = min(o.created_time for o in outs)
        end = max(o.lifespan[1] for o in outs)
        gen_s = end - start
        lengths = [len(o.generated_tokens) for o in outs]
        completion = sum(lengths)
        failed = [o.request_id for o in outs if o.error is not None]
        res["files"][path.name] = {
            "lines": len(custom_ids),
            "results": len(outs),
            "failed": len(failed),
            "prompt_tokens": sum(len(x) for x in inputs),
            "completion_tokens": completion,
            "all_max_tokens": all(n == args.max_tokens for n in lengths),
            "gen_s": round(gen_s, 3),
            "call_s": round(call_s, 3),
            "tok_s": round(completion / gen_s, 1) if gen_s > 0 else None,
        }
        res["attn_implementation"] = model.config._attn_implementation  # what continuous batching switched to
        print(f"reference {path.name}: {json.dumps(res['files'][path.name])}", flush=True)
        Path(args.result).write_text(json.dumps(res) + "\n")  # after each file: a phase stopped at its limit
        # still leaves the files it finished
    model.destroy_cached_continuous_batching_manager()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dir", required=True)
    b.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    b.add_argument("--corpus", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cpu", action="store_true", help="build on the CPU even when a GPU is there")
    r = sub.add_parser("reference")
    r.add_argument("--dir", required=True)
    r.add_argument("--max-tokens", type=int, required=True)
    r.add_argument("--result", required=True)
    r.add_argument("--device", help="device_map, as `transformers serve --device` gets it (default cuda:0)")
    for opt in ("--cb-block-size", "--cb-num-blocks", "--cb-max-batch-tokens"):
        r.add_argument(opt, type=int)
    r.add_argument("--cb-max-memory-percent", type=float)
    r.add_argument("inputs", nargs="+")
    args = ap.parse_args()
    info = build(args) if args.cmd == "build" else reference(args)
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
