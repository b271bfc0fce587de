#!/usr/bin/env python3
"""Write tiny GPT-2 and Llama checkpoints with transformers' own save_pretrained, for the interop specs.

Run with the reference venv (see spec/reference/README.md):

    bash spec/reference/setup_venv.sh
    spec/reference/.venv/bin/python spec/reference/make_hf_checkpoints.py [--out DIR]

The models are make_fixtures.py's tiny configs (V 101, 2 layers, ...), built after torch.manual_seed(0) with
transformers' own initialisation, then every parameter plus 0.05 * randn (generator seed 7), so that no two
biases or norm weights are equal (transformers makes them all 0 or 1). Every combination of

    model   gpt2 | llama
    tying   tied | untied          (tied: no lm_head.weight in the files)
    dtype   f32 | bf16             (bf16: the model converted to bfloat16 before saving)
    layout  single | indexed       (indexed: max_shard_size="20KB", so several model-0000i-of-0000n.safetensors
                                    and model.safetensors.index.json)

gets DIR/<model>_<tying>_<dtype>_<layout>/ (default DIR: spec/fixtures/hf) holding
  config.json, model*.safetensors[.index.json]   as save_pretrained wrote them (generation_config.json removed:
                                                 neither transformers' loader nor the engine needs it)
  expected.safetensors                           input_ids i64 [2,12], logits f32 [2,12,V]: transformers loading
                                                 this directory with from_pretrained(dir, dtype=torch.float32),
                                                 eval mode, eager attention (a bf16 checkpoint thus gives the
                                                 logits of its bf16 weights upcast to f32)
and DIR/meta.json (versions, and per checkpoint its class, tying, dtype, layout and files).
CPU, one thread, fixed seeds: the same bytes on every run.
"""
import argparse
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import (B, INPUT_SEED, MODEL_SEED, T, gpt2_config, llama_config, mistral_config,  # noqa: E402
                           mixtral_config, phi3_config, qwen2_config, qwen2_moe_config, qwen3_config,
                           qwen3_moe_config)
from transformers import (MistralForCausalLM, MixtralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM,  # noqa: E402
                          Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)

DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "hf"))
MAX_SHARD_SIZE = "20KB"
PERTURB_SEED = 7
PERTURB_SCALE = 0.05

MODELS = [("gpt2", GPT2LMHeadModel, gpt2_config), ("llama", LlamaForCausalLM, llama_config)]
DTYPES = [("f32", torch.float32), ("bf16", torch.bfloat16)]
LAYOUTS = ["single", "indexed"]
# The other architectures get two checkpoints each, which between them cover tying, both dtypes and both layouts:
# untied f32 in one file, and tied bf16 indexed.
EXTRA = [("mistral", MistralForCausalLM, mistral_config), ("qwen2", Qwen2ForCausalLM, qwen2_config),
         ("qwen3", Qwen3ForCausalLM, qwen3_config), ("phi3", Phi3ForCausalLM, phi3_config),
         ("mixtral", MixtralForCausalLM, mixtral_config), ("qwen2_moe", Qwen2MoeForCausalLM, qwen2_moe_config),
         ("qwen3_moe", Qwen3MoeForCausalLM, qwen3_moe_config)]
EXTRA_COMBOS = [(False, "f32", torch.float32, "single"), (True, "bf16", torch.bfloat16, "indexed")]


def checkpoints():
    """(name, model_type, class, make_config, tied, dtype name, torch dtype, layout) for every checkpoint."""
    for model_type, cls, make_config in MODELS:
        for tied in (True, False):
            for dname, dtype in DTYPES:
                for layout in LAYOUTS:
                    name = f"{model_type}_{'tied' if tied else 'untied'}_{dname}_{layout}"
                    yield name, model_type, cls, make_config, tied, dname, dtype, layout
    for model_type, cls, make_config in EXTRA:
        for tied, dname, dtype, layout in EXTRA_COMBOS:
            name = f"{model_type}_{'tied' if tied else 'untied'}_{dname}_{layout}"
            yield name, model_type, cls, make_config, tied, dname, dtype, layout


def build_model(cls, config, dtype):
    config._attn_implementation = "eager"
    torch.manual_seed(MODEL_SEED)
    model = cls(config)
    # transformers initialises every bias to 0 and every norm weight to 1: a loader that left one unread, or
    # swapped two of them (ln_1 <-> ln_2, q <-> k bias), would still give the reference logits. A fixed perturbation
    # of every parameter makes each tensor distinct.
    g = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(PERTURB_SCALE * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.to(dtype)
    model.eval()
    return model


def check_layout(d, layout, tied):
    """The files save_pretrained wrote are the layout asked for; returns their names."""
    files = sorted(os.listdir(d))
    shards = [f for f in files if f.endswith(".safetensors")]
    index = os.path.join(d, "model.safetensors.index.json")
    if layout == "single":
        assert shards == ["model.safetensors"], f"{d}: expected one model.safetensors, got {files}"
        assert not os.path.exists(index), f"{d}: unexpected index"
        from safetensors import safe_open
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            keys = set(f.keys())
    else:
        assert os.path.exists(index), f"{d}: no model.safetensors.index.json (max_shard_size ignored?)"
        n = len(shards)
        assert n >= 3, f"{d}: only {n} shard(s) with max_shard_size={MAX_SHARD_SIZE}"
        want = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert shards == want, f"{d}: shard names {shards}, expected {want}"
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        assert sorted(set(wm.values())) == want, f"{d}: the index does not use every shard"
        keys = set(wm)
    assert ("lm_head.weight" in keys) == (not tied), f"{d}: lm_head.weight present={'lm_head.weight' in keys}, tied={tied}"
    return files


def make_checkpoint(out_root, name, cls, make_config, tied, dtype, layout):
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    config = make_config(tied)
    model = build_model(cls, config, dtype)
    for n, p in model.named_parameters():
        assert p.dtype == dtype, f"{name}: parameter {n} is {p.dtype}, expected {dtype}"
    if layout == "single":
        model.save_pretrained(d)
    else:
        model.save_pretrained(d, max_shard_size=MAX_SHARD_SIZE)
    gen_cfg = os.path.join(d, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    files = check_layout(d, layout, tied)

    # the reference logits come from transformers reading the directory back, not from the model in memory
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    assert type(ref) is cls, f"{name}: loaded as {type(ref).__name__}, expected {cls.__name__}"
    assert ref.config._attn_implementation == "eager"
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
            assert n == n2 and torch.equal(p.to(torch.float32), p2), f"{name}: reloaded parameter {n} differs"
    gen = torch.Generator().manual_seed(INPUT_SEED)
    input_ids = torch.randint(0, config.vocab_size, (B, T), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        logits = ref(input_ids=input_ids).logits
    assert logits.dtype == torch.float32 and logits.shape == (B, T, config.vocab_size), (logits.dtype, logits.shape)
    save_file({"input_ids": input_ids, "logits": logits.contiguous()}, os.path.join(d, "expected.safetensors"),
              metadata={"format": "pt"})
    print(f"{name}: {len(files)} files, logits max |x| {float(logits.abs().max()):.6f}")
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output root (default: spec/fixtures/hf)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # determinism across machines
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "model_seed": MODEL_SEED, "perturb_seed": PERTURB_SEED, "perturb_scale": PERTURB_SCALE,
            "input_seed": INPUT_SEED, "batch": B, "seq": T,
            "max_shard_size": MAX_SHARD_SIZE, "checkpoints": []}
    for name, model_type, cls, make_config, tied, dname, dtype, layout in checkpoints():
        files = make_checkpoint(args.out, name, cls, make_config, tied, dtype, layout)
        meta["checkpoints"].append({"name": name, "model_type": model_type, "model_class": cls.__name__,
                                    "tied": tied, "dtype": dname, "layout": layout, "files": files})
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
