#!/usr/bin/env python3
"""Generate spec/fixtures/tied_head/: checkpoints whose config says tie_word_embeddings but whose files disagree,
loaded by transformers' own from_pretrained to record what it does with them.

    spec/reference/.venv/bin/python spec/reference/make_tied_head_fixtures.py [--out DIR]

From each tied fixture NAME (spec/fixtures/NAME: config.json with tie_word_embeddings true, a file without
lm_head.weight) it writes, with the same config.json:
  NAME_own_head/   the file plus an lm_head.weight of its own (seeded, unlike the embedding): transformers warns
                   and keeps both, untied
  NAME_head_only/  the file with the embedding stored under lm_head.weight only: transformers ties the embedding
                   to the stored head
each with expected.safetensors: input_ids (the fixture's) and transformers' logits for them, in float32 on CPU.
"""
import argparse
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "fixtures"))
EMBEDDING = {"gpt2_tied": "transformer.wte.weight", "llama_tied": "model.embed_tokens.weight"}
HEAD_SEED = 4321


def write(out, src, tensors):
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), os.path.join(out, "config.json"))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    ids = load_file(os.path.join(src, "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    save_file({"input_ids": ids, "logits": logits}, os.path.join(out, "expected.safetensors"))
    print(f"{out}: lm_head tied to the embedding: {head.data_ptr() == emb.data_ptr()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "tied_head"))
    args = ap.parse_args()
    for name, emb_key in EMBEDDING.items():
        src = os.path.join(FIXTURES, name)
        tensors = load_file(os.path.join(src, "model.safetensors"))
        emb = tensors[emb_key]
        g = torch.Generator().manual_seed(HEAD_SEED)
        own = dict(tensors)
        own["lm_head.weight"] = (torch.randn(emb.shape, generator=g) * 0.02).to(emb.dtype)
        write(os.path.join(args.out, name + "_own_head"), src, own)
        only = {k: v for k, v in tensors.items() if k != emb_key}
        only["lm_head.weight"] = emb.clone()
        write(os.path.join(args.out, name + "_head_only"), src, only)


if __name__ == "__main__":
    main()
