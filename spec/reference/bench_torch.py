#!/usr/bin/env python3
"""PyTorch eager-mode (no torch.compile) CPU training benchmark, the baseline for `make bench`.

GPT2LMHeadModel (vocab 256, n_positions 256, n_embd 384, n_layer 6, n_head 6, dropouts 0, tied embeddings),
batch 8 x seq 256 of random tokens (fixed seed, labels = input_ids), AdamW(lr 3e-4, weight_decay 0.1),
clip_grad_norm_(1.0). Each timed step: zero_grad, forward+loss, backward, clip, optimizer step.
--size NAME trains one of the real sizes of SIZES instead (spec/bench/common.lua's, for `make bench-scale`),
built from transformers' config classes; --batch and --seq default to the size's.

Usage: spec/reference/.venv/bin/python spec/reference/bench_torch.py --threads 2 --steps 5 --warmup 2
Prints ONE json line: tokens_per_s, step_ms, peak_rss_mb, params, threads (+ a few descriptive extras).
"""
import argparse
import json
import resource
import sys
import time

import torch
import transformers

# The shapes of spec/bench/common.lua's M.SIZES (a change there comes here too): (model, config, seq, batch).
SIZES = {
    "bench": ("gpt2", dict(vocab_size=256, n_positions=256, n_embd=384, n_layer=6, n_head=6), 256, 8),
    "gpt2": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12), 256, 4),
    "gpt2-medium": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16), 256, 4),
    "llama-1b": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                               tie_word_embeddings=False), 256, 2),
}


def max_seq(size):
    cfg = SIZES[size][1]
    return cfg.get("n_positions") or cfg["max_position_embeddings"]


def build_model(size, attn):
    """The size's causal LM in f32 with dropouts 0, initialised from the current torch seed; and its layers
    (FSDP2 shards each, then the root)."""
    kind, kw, _, _ = SIZES[size]
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                         dtype="float32")
        cfg._attn_implementation = attn
        model = GPT2LMHeadModel(cfg).to(torch.float32)
        return model, model.transformer.h
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**kw, attention_dropout=0.0, dtype="float32")
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(torch.float32)
    return model, model.model.layers


def size_args(ap):
    """--size, --batch, --seq (the last two default to the size's); check_size_args fills and checks them."""
    ap.add_argument("--size", choices=list(SIZES), default="bench", help="model size (spec/bench/common.lua)")
    ap.add_argument("--batch", type=int, default=None, help="(global) batch; default: the size's")
    ap.add_argument("--seq", type=int, default=None, help="default: the size's")


def check_size_args(ap, args):
    _, _, seq, batch = SIZES[args.size]
    args.seq = args.seq or seq
    args.batch = args.batch or batch
    if args.seq > max_seq(args.size):
        ap.error(f"--seq must be <= {max_seq(args.size)} for --size {args.size}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    size_args(ap)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="attention kernel: sdpa (transformers' default) or eager (explicit matmul+softmax)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    check_size_args(ap, args)

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)

    model, _ = build_model(args.size, args.attn)
    vocab = model.config.vocab_size
    model.train()
    params = sum(p.numel() for p in model.parameters())  # tied wte counted once
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    gen = torch.Generator().manual_seed(args.seed + 1)

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen, dtype=torch.int64)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    loss = float("nan")
    for _ in range(args.steps):
        loss = step()
    dt = time.perf_counter() - t0

    steps = max(args.steps, 1)
    out = {
        "tokens_per_s": round(args.batch * args.seq * args.steps / dt, 2) if dt > 0 else 0.0,
        "step_ms": round(1000.0 * dt / steps, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "params": params,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": args.batch,
        "seq": args.seq,
        "size": args.size,
        "attn": args.attn,
        "last_loss": round(loss, 6),
        "engine": "torch-eager",
        "torch_version": torch.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
