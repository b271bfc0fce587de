#!/usr/bin/env python3
"""PyTorch eager-mode (no torch.compile) CPU training benchmark, the baseline for `make bench`.

GPT2LMHeadModel (vocab 256, n_positions 256, n_embd 384, n_layer 6, n_head 6, dropouts 0, tied embeddings),
batch 8 x seq 256 of random tokens (fixed seed, labels = input_ids), AdamW(lr 3e-4, weight_decay 0.1),
clip_grad_norm_(1.0). Each timed step: zero_grad, forward+loss, backward, clip, optimizer step.

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
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, NPOS, EMBD, LAYERS, HEADS = 256, 256, 384, 6, 6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="attention kernel: sdpa (transformers' default) or eager (explicit matmul+softmax)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.seq > NPOS:
        ap.error(f"--seq must be <= {NPOS}")

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=NPOS, n_embd=EMBD, n_layer=LAYERS, n_head=HEADS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                     dtype="float32")
    cfg._attn_implementation = args.attn
    model = GPT2LMHeadModel(cfg).to(torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())  # tied wte counted once
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    gen = torch.Generator().manual_seed(args.seed + 1)

    def step():
        ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen, dtype=torch.int64)
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
        "attn": args.attn,
        "last_loss": round(loss, 6),
        "engine": "torch-eager",
        "torch_version": torch.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
