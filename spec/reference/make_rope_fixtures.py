#!/usr/bin/env python3
"""Write tiny checkpoints with scaled RoPE (rope_type linear, dynamic, yarn, llama3, longrope) and transformers'
logits past original_max_position_embeddings, for spec/rope_scaling_spec.lua.

Run with the reference venv (see spec/reference/README.md):

    spec/reference/.venv/bin/python spec/reference/make_rope_fixtures.py [--out DIR]

Each case gets DIR/<name>/ (default DIR: spec/fixtures/rope) holding
  config.json          the config as written below: v5 `rope_parameters`, or v4 `rope_scaling` + `rope_theta` (the
                       loader folds those as transformers does), read back by from_pretrained for the references
  model.safetensors    one layer, hidden 32, 2 heads of 16, the weights of torch.manual_seed(0) plus 0.05 * randn
  expected.safetensors input_ids i64 [1, 40] and
                       logits       f32 [1, 40, V]  a fresh model on all 40 tokens (past every original length)
                       logits_short f32 [1, 12, V]  a fresh model on the first 12 (inside it)
                       logits_after f32 [1, 20, V]  the model that ran the 40 tokens, then the first 20: dynamic keeps
                                                    the frequencies of the longest length it has seen
                       gen_tokens   i64 [1, 32]     greedy generate (transformers' KV cache) of 20 tokens after the
                                                    first 12, no eos
                       gen_logits   f32 [20, V]     the logits of each of its steps (output_logits)
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
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "rope"))
T, T_SHORT, T_AFTER, NEW = 40, 12, 20, 20

BASE = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"}

# (name, model_type, architecture, config keys over BASE)
CASES = [
    ("llama_linear", "llama", "LlamaForCausalLM",
     {"max_position_embeddings": 16, "rope_parameters": {"rope_type": "linear", "factor": 2.5, "rope_theta": 500.0}}),
    # v4 form: rope_scaling with "type", top-level rope_theta
    ("llama_dynamic_v4", "llama", "LlamaForCausalLM",
     {"max_position_embeddings": 16, "rope_theta": 5000.0, "rope_scaling": {"type": "dynamic", "factor": 3.0}}),
    ("llama_llama3", "llama", "LlamaForCausalLM",
     {"max_position_embeddings": 128, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0,
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    # Qwen2.5 long-context form: v4 rope_scaling yarn + rope_theta
    ("qwen2_yarn_v4", "qwen2", "Qwen2ForCausalLM",
     {"max_position_embeddings": 64, "rope_theta": 10000.0, "use_sliding_window": False,
      "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    ("qwen3_yarn_mscale", "qwen3", "Qwen3ForCausalLM",
     {"max_position_embeddings": 64, "attention_bias": False, "rope_parameters": {"rope_type": "yarn",
      "rope_theta": 20000.0, "factor": 3.0, "original_max_position_embeddings": 16, "mscale": 0.8,
      "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False}}),
    ("mistral_dynamic", "mistral", "MistralForCausalLM",
     {"max_position_embeddings": 24, "sliding_window": None,
      "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    # Phi-3-128k form: v4 rope_scaling type longrope, top-level original_max_position_embeddings, half rotated
    ("phi3_longrope_v4", "phi3", "Phi3ForCausalLM",
     {"max_position_embeddings": 64, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
      "partial_rotary_factor": 0.5, "pad_token_id": 60, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
      "sliding_window": None, "rope_scaling": {"type": "longrope",
      "short_factor": [1.0, 1.1, 1.25, 1.5], "long_factor": [1.0, 2.5, 7.0, 19.0]}}),
]


def load(d):
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def make_case(out_root, name, model_type, arch, keys):
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg = dict(BASE, model_type=model_type, architectures=[arch], **keys)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    config = transformers.AutoConfig.from_pretrained(d)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()
               if not n.endswith("rotary_emb.inv_freq")}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})
    ids = torch.randint(0, BASE["vocab_size"] - 1, (1, T), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        logits = load(d)(input_ids=ids).logits
        short = load(d)(input_ids=ids[:, :T_SHORT]).logits
        m = load(d)
        m(input_ids=ids)
        after = m(input_ids=ids[:, :T_AFTER]).logits
        g = load(d)
        res = g.generate(ids[:, :T_SHORT], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, T_SHORT, dtype=torch.int64),
                         output_logits=True, return_dict_in_generate=True)
    gen, gen_logits = res.sequences, torch.cat(res.logits, 0)
    assert gen.shape == (1, T_SHORT + NEW) and gen_logits.shape == (NEW, BASE["vocab_size"]), gen.shape
    save_file({"input_ids": ids, "logits": logits.contiguous(), "logits_short": short.contiguous(),
               "logits_after": after.contiguous(), "gen_tokens": gen.contiguous(),
               "gen_logits": gen_logits.contiguous()},
              os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})
    print(f"{name}: rope {g.config.rope_parameters}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output root (default: spec/fixtures/rope)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    for case in CASES:
        make_case(args.out, *case)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump({"torch_version": torch.__version__, "transformers_version": transformers.__version__,
                   "cases": [c[0] for c in CASES]}, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
