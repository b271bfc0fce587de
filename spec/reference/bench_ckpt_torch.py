#!/usr/bin/env python3
"""Checkpoint I/O baselines for spec/bench/bench_ckpt.lua (`make bench`): Python safetensors and
torch.distributed.checkpoint (DCP), on the model of the bench (GPT-2 shapes given by the flags; f32; the tied head
not written, so the bytes are those of our save_pretrained).

--mode safetensors  one process. A state dict of the GPT-2's parameters under their Hugging Face names and shapes
                    (GPT2LMHeadModel built on meta for the shapes, then torch.randn tensors; the tied lm_head.weight
                    appears once, as transformer.wte.weight). save: save_file(sd, path, metadata={"format": "pt"})
                    then os.fsync of the file (seconds; seconds_nosync without the fsync). load:
                    load_file(path, backend="pread"), which reads every byte into process memory as our
                    from_pretrained does. The default mmap backend only maps the page cache; it is timed once,
                    warm, with every page touched (info line, mmap_touch_s), and is not the same work.
--mode dcp          --world ranks (torch.multiprocessing.spawn, gloo on 127.0.0.1, CPU). GPT2LMHeadModel built on
                    meta, fully_shard on each GPT2Block and then the root (FSDP2), to_empty(device="cpu"), every
                    local shard filled with normal(0, 0.02). save: dcp.save(model.state_dict() without
                    lm_head.weight, checkpoint_id=dir) with the default FileSystemWriter (which fsyncs its files).
                    load: the resume path, as our from_pretrained does it: the sharded model built again (meta,
                    fully_shard, to_empty) and dcp.load into it; load_inplace: dcp.load alone, into the existing
                    sharded parameters (no allocation). Each timed call starts after a barrier and ends after
                    one, so its time is the slowest rank's.

Each save goes to a new path (removed after, untimed); the loads read the last save. --cold: before each load,
timed again, the page cache is dropped (os.sync, then "1" into /proc/sys/vm/drop_caches; needs root).

Usage: spec/reference/.venv/bin/python spec/reference/bench_ckpt_torch.py --mode safetensors|dcp --dir DIR
       [--world 2 --n-embd 1024 --n-layer 24 --n-head 16 --vocab 50257 --n-positions 1024 --repeats 3 --cold]
Prints one JSON line per measurement: contender, ranks, op (save|load|load_inplace), cache (n/a|warm|cold), repeat, seconds,
bytes (+ seconds_nosync for safetensors saves); then one line with op "info" (peak_rss_mb_per_rank, params, ...).
"""
import argparse
import datetime
import gc
import json
import os
import resource
import shutil
import socket
import sys
import time

import torch

DROP_CACHES = "/proc/sys/vm/drop_caches"


def emit(rec):
    print(json.dumps(rec), flush=True)


def drop_caches():
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("1\n")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpt2_config(args):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=args.vocab, n_positions=args.n_positions, n_embd=args.n_embd,
                      n_layer=args.n_layer, n_head=args.n_head, tie_word_embeddings=True, dtype="float32")


def gpt2_on_meta(args):
    import transformers
    from transformers import GPT2LMHeadModel
    transformers.logging.set_verbosity_error()
    with torch.device("meta"):
        return GPT2LMHeadModel(gpt2_config(args)).to(torch.float32)


def dir_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_safetensors(args):
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    meta = gpt2_on_meta(args)
    gen = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(tuple(p.shape), generator=gen) * 0.02 for name, p in meta.named_parameters()}
    del meta
    params = sum(t.numel() for t in sd.values())
    base = {"contender": "safetensors", "ranks": 1, "params": params}

    def path_of(r):
        return os.path.join(args.dir, f"st-r{r}.safetensors")

    nbytes = 0
    for r in range(1, args.repeats + 1):
        path = path_of(r)
        t0 = time.perf_counter()
        save_file(sd, path, metadata={"format": "pt"})
        t1 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        t2 = time.perf_counter()
        nbytes = os.path.getsize(path)
        emit(dict(base, op="save", cache="n/a", repeat=r, seconds=t2 - t0, seconds_nosync=t1 - t0, bytes=nbytes))
        if r < args.repeats:
            os.remove(path)
    del sd
    gc.collect()
    last = path_of(args.repeats)

    try:
        load_file(last, backend="pread")
        pread = True
    except TypeError:   # safetensors before the backend option: load_file maps the file
        pread = False
    gc.collect()

    def load_once():
        d = load_file(last, backend="pread") if pread else load_file(last)
        if not pread:
            for t in d.values():
                t.reshape(-1).view(torch.uint8)[::4096].sum()
        return d

    for cache in (["warm", "cold"] if args.cold else ["warm"]):
        for r in range(1, args.repeats + 1):
            if cache == "cold":
                drop_caches()
            t0 = time.perf_counter()
            d = load_once()
            dt = time.perf_counter() - t0
            emit(dict(base, op="load", cache=cache, repeat=r, seconds=dt, bytes=nbytes))
            del d
            gc.collect()

    # The default backend (mmap): maps the file; touching one byte of every 4 KiB page faults it in from the page
    # cache, without a copy.
    t0 = time.perf_counter()
    d = load_file(last)
    for t in d.values():
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    mmap_touch = time.perf_counter() - t0
    del d
    gc.collect()
    os.remove(last)
    emit(dict(base, op="info", bytes=nbytes, peak_rss_mb_per_rank=[round(peak_rss_mb(), 1)], load_backend=
              "pread" if pread else "mmap+touch", mmap_touch_s=mmap_touch,
              safetensors_version=__import__("safetensors").__version__, torch_version=torch.__version__))


def die_with_parent():
    # A rank whose parent was killed (the caller's wall-clock limit) ends at once instead of waiting in a
    # collective until the gloo timeout: PR_SET_PDEATHSIG (Linux) = 1, SIGKILL.
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def dcp_worker(rank, args, port):
    die_with_parent()
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // args.world))
    dist.init_process_group("gloo", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    mesh = init_device_mesh("cpu", (args.world,))
    fully_shard = fully_shard_fn()

    def sharded_model(seed):
        # GPT2LMHeadModel on meta, fully_shard per block then the root, to_empty: the resume path's model
        model = gpt2_on_meta(args)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    local = p.to_local() if hasattr(p, "to_local") else p
                    local.copy_(torch.randn(local.shape, generator=gen) * 0.02)
        # The parameters only, once each (the tied head is the embedding's tensor: not written, as in ours)
        names = {name for name, _ in model.named_parameters()}
        names.discard("lm_head.weight")
        return model, {k: v for k, v in model.state_dict().items() if k in names}

    model, sd = sharded_model(rank)
    params = sum(p.numel() for p in model.parameters())
    base = {"contender": "dcp", "ranks": args.world, "params": params}

    def path_of(r):
        return os.path.join(args.dir, f"dcp-n{args.world}-r{r}")

    nbytes = 0
    for r in range(1, args.repeats + 1):
        path = path_of(r)
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(sd, checkpoint_id=path)
        dist.barrier()
        dt = time.perf_counter() - t0
        if rank == 0:
            nbytes = dir_bytes(path)
            emit(dict(base, op="save", cache="n/a", repeat=r, seconds=dt, bytes=nbytes))
            if r < args.repeats:
                shutil.rmtree(path)
        dist.barrier()
    last = path_of(args.repeats)

    # Two loads: "load", the resume path as from_pretrained does it (the sharded model built on meta, to_empty,
    # then dcp.load into it), and "load_inplace", dcp.load alone into the existing model (no allocation at all).
    for cache in (["warm", "cold"] if args.cold else ["warm"]):
        for op in ("load", "load_inplace"):
            for r in range(1, args.repeats + 1):
                dist.barrier()
                if cache == "cold" and rank == 0:
                    drop_caches()
                dist.barrier()
                t0 = time.perf_counter()
                if op == "load":
                    fresh, fresh_sd = sharded_model(None)
                    dcp.load(fresh_sd, checkpoint_id=last)
                else:
                    dcp.load(sd, checkpoint_id=last)
                dist.barrier()
                dt = time.perf_counter() - t0
                if op == "load":
                    del fresh, fresh_sd
                    gc.collect()
                if rank == 0:
                    emit(dict(base, op=op, cache=cache, repeat=r, seconds=dt, bytes=nbytes))

    everyone = [None] * args.world
    dist.all_gather_object(everyone, round(peak_rss_mb(), 1))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(last)
        emit(dict(base, op="info", bytes=nbytes, peak_rss_mb_per_rank=everyone, torch_version=torch.__version__,
                  writer="FileSystemWriter defaults (sync_files=True, thread_count=1)"))
    dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["safetensors", "dcp"], required=True)
    ap.add_argument("--dir", required=True, help="an existing directory for the checkpoints (removed after)")
    ap.add_argument("--world", type=int, default=2, help="ranks of --mode dcp")
    ap.add_argument("--n-embd", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-head", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--n-positions", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also time each load with the page cache dropped first")
    ap.add_argument("--timeout", type=int, default=900, help="collective timeout in seconds")
    args = ap.parse_args()
    if not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir} is not a directory")
    if args.repeats < 1 or args.world < 1:
        ap.error("--repeats and --world must be >= 1")
    if args.mode == "safetensors":
        run_safetensors(args)
    else:
        import torch.multiprocessing as mp
        mp.spawn(dcp_worker, args=(args, free_port()), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
