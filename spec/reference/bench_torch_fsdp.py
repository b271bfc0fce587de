#!/usr/bin/env python3
"""PyTorch FSDP2 CPU training benchmark, the baseline for spec/bench/bench_dist.lua (`make bench`).

The bench model of bench_torch.py (GPT2LMHeadModel, vocab 256, n_positions 256, n_embd 384, n_layer 6,
n_head 6, dropouts 0, tied embeddings, eager mode) sharded with FSDP2: fully_shard on each GPT2Block, then on
the root, over a 1-D CPU device mesh of --world ranks (gloo backend, torch.multiprocessing.spawn, rendezvous on
127.0.0.1). Global batch 8 x seq 256 of random tokens (the same fixed-seed batch on every rank; rank r takes
rows [r * B/N, (r+1) * B/N)), labels = input_ids, AdamW(lr 3e-4, weight_decay 0.1), clip_grad_norm_(1.0).
Each timed step: zero_grad, forward+loss, backward, clip, optimizer step. Threads per rank: --threads, by
default the cores this process may use divided by the world size (as `fsdp-lua -n N` does). --size NAME trains
one of bench_torch.py's SIZES instead (fully_shard on each decoder layer, then the root); --batch and --seq
default to the size's.

Usage: spec/reference/.venv/bin/python spec/reference/bench_torch_fsdp.py --steps 5 --warmup 2
Prints ONE json line: tokens_per_s (global), step_ms, peak_rss_mb (max over ranks), peak_rss_mb_per_rank,
world, threads_per_rank (+ descriptive extras).
"""
import argparse
import datetime
import json
import os
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench_torch import build_model, check_size_args, size_args


def fully_shard_fn():
    # FSDP2: torch.distributed.fsdp.fully_shard from 2.6 on; torch.distributed._composable.fsdp before.
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def die_with_parent():
    # A rank whose parent was killed (the caller's wall-clock limit) ends at once instead of waiting in a
    # collective until the gloo timeout: PR_SET_PDEATHSIG (Linux) = 1, SIGKILL.
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def worker(rank, args, port):
    die_with_parent()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    transformers.logging.set_verbosity_error()

    dist.init_process_group("gloo", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    mesh = init_device_mesh("cpu", (args.world,))
    fully_shard = fully_shard_fn()

    torch.manual_seed(args.seed)   # the same full initialisation on every rank; fully_shard keeps each its rows
    model, layers = build_model(args.size, args.attn)
    vocab = model.config.vocab_size
    model.train()
    params = sum(p.numel() for p in model.parameters())
    for block in layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    per = args.batch // args.world
    gen = torch.Generator().manual_seed(args.seed + 1)

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen, dtype=torch.int64)
        ids = ids[rank * per:(rank + 1) * per].contiguous()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    loss = float("nan")
    for _ in range(args.steps):
        loss = step()
    dist.barrier()   # the step time is the slowest rank's
    dt = time.perf_counter() - t0

    mine = {"rank": rank, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "loss": loss}
    everyone = [None] * args.world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        steps = max(args.steps, 1)
        rss = [round(e["peak_rss_mb"], 1) for e in everyone]
        out = {
            "tokens_per_s": round(args.batch * args.seq * args.steps / dt, 2) if dt > 0 else 0.0,
            "step_ms": round(1000.0 * dt / steps, 3),
            "peak_rss_mb": max(rss),
            "peak_rss_mb_per_rank": rss,
            "world": args.world,
            "threads_per_rank": args.threads,
            "params": params,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": args.batch,
            "seq": args.seq,
            "size": args.size,
            "attn": args.attn,
            "last_loss_mean": round(sum(e["loss"] for e in everyone) / args.world, 6),
            "engine": "torch-fsdp2-gloo",
            "torch_version": torch.__version__,
        }
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="ranks (processes)")
    ap.add_argument("--threads", type=int, default=0, help="threads per rank (0: usable cores / world, at least 1)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    size_args(ap)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=300, help="collective timeout in seconds")
    args = ap.parse_args()
    check_size_args(ap, args)
    if args.world < 1 or args.batch % args.world != 0:
        ap.error(f"--batch {args.batch} must split evenly over --world {args.world}")
    if args.threads <= 0:
        args.threads = max(1, len(os.sched_getaffinity(0)) // args.world)
    mp.spawn(worker, args=(args, free_port()), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
