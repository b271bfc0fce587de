#!/usr/bin/env python3
"""Generate the golden fixtures under spec/fixtures/ with PyTorch + Hugging Face transformers.

Run with the reference venv (see spec/reference/README.md):

    bash spec/reference/setup_venv.sh
    spec/reference/.venv/bin/python spec/reference/make_fixtures.py [--out DIR]

For each tiny model config NAME it writes spec/fixtures/NAME/:
  config.json, model.safetensors   transformers' own save_pretrained of the seed-0 model
                                   (tied models have no lm_head.weight)
  generation_config.json           also written by save_pretrained; not needed by the engine
  expected.safetensors             input_ids, labels, logits, loss, grad.<param>, adamw_losses, after3.<param>
  meta.json                        versions, model class, AdamW hyper-parameters
and spec/fixtures/ops/expected.safetensors (+ meta.json) with single-op references.
Everything runs on CPU in float32 and is deterministic.
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures"))

B, T = 2, 12
INPUT_SEED = 1234
MODEL_SEED = 0
ADAMW = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
ADAMW_STEPS = 3


def gpt2_config(tied):
    return GPT2Config(
        vocab_size=101,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=tied,
        dtype="float32",
    )


def llama_config(tied):
    return LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 if tied else 5000.0},
        attention_bias=not tied,
        mlp_bias=not tied,
        attention_dropout=0.0,
        max_position_embeddings=64,
        initializer_range=0.02,
        tie_word_embeddings=tied,
        dtype="float32",
    )


def mistral_config(tied):
    # a window of 4 inside 12-token sequences: the sliding-window mask's boundary is exercised
    return MistralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, hidden_act="silu", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, sliding_window=4, attention_dropout=0.0,
        max_position_embeddings=64, initializer_range=0.02, tie_word_embeddings=tied, dtype="float32",
    )


def qwen2_config(tied):
    # layer 0 full attention, layer 1 a window of 4
    return Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=True,
        sliding_window=4, max_window_layers=1, attention_dropout=0.0, max_position_embeddings=64,
        initializer_range=0.02, tie_word_embeddings=tied, dtype="float32",
    )


def qwen3_config(tied):
    # explicit head_dim 16: nH * hd = 64 differs from hidden 48; q/k/v/o biases when untied
    return Qwen3Config(
        vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, hidden_act="silu", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, attention_bias=not tied,
        attention_dropout=0.0, max_position_embeddings=64, initializer_range=0.02, tie_word_embeddings=tied,
        dtype="float32",
    )


def phi3_config(tied):
    # fused qkv with GQA, fused gate_up, half the channels rotated (untied) or all (tied), a padding row
    return Phi3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 1.0 if tied else 0.5},
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=100, bos_token_id=1, eos_token_id=100,
        sliding_window=None, max_position_embeddings=64, original_max_position_embeddings=64,
        initializer_range=0.02, tie_word_embeddings=tied, dtype="float32",
    )


def mixtral_config(tied):
    return MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2,
        router_jitter_noise=0.0, output_router_logits=True, router_aux_loss_coef=0.02, sliding_window=None,
        attention_dropout=0.0, max_position_embeddings=64, initializer_range=0.02, tie_word_embeddings=tied,
        dtype="float32",
    )


def qwen3_moe_config(tied):
    # layer 0 dense, layer 1 routed; renormalised top-k only in the tied variant
    return Qwen3MoeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="silu", rms_norm_eps=1e-6,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=tied, decoder_sparse_step=1, mlp_only_layers=[0],
        output_router_logits=True, router_aux_loss_coef=0.02, attention_dropout=0.0, max_position_embeddings=64,
        initializer_range=0.02, tie_word_embeddings=tied, dtype="float32",
    )


def qwen2_moe_config(tied):
    # layer 0 dense, layer 1 routed with the shared expert and its sigmoid gate
    return Qwen2MoeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        hidden_act="silu", rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, norm_topk_prob=not tied,
        decoder_sparse_step=1, mlp_only_layers=[0], output_router_logits=True, router_aux_loss_coef=0.02,
        attention_dropout=0.0, max_position_embeddings=64, initializer_range=0.02, tie_word_embeddings=tied,
        dtype="float32",
    )


# (name, class, config, perturb): perturbed fixtures add 0.05 * randn (seed 7) to every parameter after
# transformers' init, so that no bias or norm weight is 0 or 1 and a loader or layer that swaps or skips one
# changes the logits. The first four predate that and keep transformers' init.
CONFIGS = [
    ("gpt2_tied", GPT2LMHeadModel, lambda: gpt2_config(True), False),
    ("gpt2_untied", GPT2LMHeadModel, lambda: gpt2_config(False), False),
    ("llama_untied", LlamaForCausalLM, lambda: llama_config(False), False),
    ("llama_tied", LlamaForCausalLM, lambda: llama_config(True), False),
    ("mistral_untied", MistralForCausalLM, lambda: mistral_config(False), True),
    ("mistral_tied", MistralForCausalLM, lambda: mistral_config(True), True),
    ("qwen2_untied", Qwen2ForCausalLM, lambda: qwen2_config(False), True),
    ("qwen2_tied", Qwen2ForCausalLM, lambda: qwen2_config(True), True),
    ("qwen3_untied", Qwen3ForCausalLM, lambda: qwen3_config(False), True),
    ("qwen3_tied", Qwen3ForCausalLM, lambda: qwen3_config(True), True),
    ("phi3_untied", Phi3ForCausalLM, lambda: phi3_config(False), True),
    ("phi3_tied", Phi3ForCausalLM, lambda: phi3_config(True), True),
    ("mixtral_untied", MixtralForCausalLM, lambda: mixtral_config(False), True),
    ("mixtral_tied", MixtralForCausalLM, lambda: mixtral_config(True), True),
    ("qwen2_moe_untied", Qwen2MoeForCausalLM, lambda: qwen2_moe_config(False), True),
    ("qwen2_moe_tied", Qwen2MoeForCausalLM, lambda: qwen2_moe_config(True), True),
    ("qwen3_moe_untied", Qwen3MoeForCausalLM, lambda: qwen3_moe_config(False), True),
    ("qwen3_moe_tied", Qwen3MoeForCausalLM, lambda: qwen3_moe_config(True), True),
]


def checkpoint_names(model_type, named):
    """transformers v5 keeps experts fused in memory (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    checkpoints, and the engine, name each expert. Returns [(checkpoint name, tensor)] in the engine's parameter
    order: each fused pair becomes, expert by expert, Mixtral's w1 (gate rows), w2 (down), w3 (up rows) under
    block_sparse_moe, or Qwen's gate_proj, up_proj, down_proj."""
    d = dict(named)
    out = []
    for n, t in named:
        if n.endswith(".mlp.experts.down_proj"):
            continue
        if n.endswith(".mlp.experts.gate_up_proj"):
            pre = n[: -len(".mlp.experts.gate_up_proj")]
            down = d[pre + ".mlp.experts.down_proj"]
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                gate, up, dn = t[e, :half], t[e, half:], down[e]
                if model_type == "mixtral":
                    base = f"{pre}.block_sparse_moe.experts.{e}"
                    out += [(base + ".w1.weight", gate), (base + ".w2.weight", dn), (base + ".w3.weight", up)]
                else:
                    base = f"{pre}.mlp.experts.{e}"
                    out += [(base + ".gate_proj.weight", gate), (base + ".up_proj.weight", up),
                            (base + ".down_proj.weight", dn)]
            continue
        if model_type == "mixtral" and ".mlp.gate." in n:
            n = n.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        out.append((n, t))
    return out
PERTURB_SEED, PERTURB_SCALE = 7, 0.05


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def build_model(cls, config, perturb=False):
    config._attn_implementation = "eager"
    torch.manual_seed(MODEL_SEED)
    model = cls(config)
    if perturb:
        g = torch.Generator().manual_seed(PERTURB_SEED)
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.add_(PERTURB_SCALE * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.to(torch.float32)
    model.train()
    return model


def check_dropouts_zero(model):
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Dropout):
            assert mod.p == 0.0, f"dropout {name} has p={mod.p}"


def make_model_fixture(out_root, name, cls, make_config, perturb=False):
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)

    config = make_config()
    model = build_model(cls, config, perturb)
    check_dropouts_zero(model)
    assert model.config._attn_implementation == "eager"
    tied = bool(config.tie_word_embeddings)
    if tied:
        assert model.lm_head.weight is model.get_input_embeddings().weight

    model.save_pretrained(d)  # v5 always writes safetensors (safe_serialization is gone)
    assert os.path.exists(os.path.join(d, "model.safetensors")), os.listdir(d)
    if hasattr(model.config, "num_experts_per_tok"):
        # the same weights in v5's fused in-memory layout (mlp.experts.gate_up_proj / down_proj): NAME_fused/
        fd = d + "_fused"
        if os.path.isdir(fd):
            shutil.rmtree(fd)
        model.save_pretrained(fd, save_original_format=False)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(fd, extra)):
                os.remove(os.path.join(fd, extra))
    assert not os.path.exists(os.path.join(d, "model.safetensors.index.json"))

    V = config.vocab_size
    gen = torch.Generator().manual_seed(INPUT_SEED)
    input_ids = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    labels = input_ids.clone()
    labels[1, 3:6] = -100

    out = {"input_ids": input_ids, "labels": labels}

    # forward + backward on the freshly built model (its weights == the saved ones)
    model.zero_grad(set_to_none=True)
    res = model(input_ids=input_ids, labels=labels)
    res.loss.backward()
    out["logits"] = f32(res.logits)
    out["loss"] = f32(res.loss).reshape(())
    if getattr(res, "aux_loss", None) is not None:
        out["aux_loss"] = f32(res.aux_loss).reshape(())
    params = list(model.named_parameters())
    for n, p in params:
        assert p.grad is not None, n
    grads = checkpoint_names(config.model_type, [(n, p.grad) for n, p in params])
    names = [n for n, _ in grads]
    assert len(set(names)) == len(names)
    if tied:
        assert "lm_head.weight" not in names
    for n, g in grads:
        out["grad." + n] = f32(g)

    # 3 AdamW steps starting again from the saved weights
    model2 = cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    model2.train()
    check_dropouts_zero(model2)
    sd1 = dict(model.named_parameters())
    names2 = [n for n, _ in checkpoint_names(config.model_type, list(model2.named_parameters()))]
    assert names2 == names, (names2, names)
    with torch.no_grad():
        for n, p in model2.named_parameters():
            assert torch.equal(p, sd1[n]), f"reloaded param {n} differs"
    opt = torch.optim.AdamW(
        model2.parameters(),
        lr=ADAMW["lr"],
        betas=tuple(ADAMW["betas"]),
        eps=ADAMW["eps"],
        weight_decay=ADAMW["weight_decay"],
        foreach=False,
    )
    losses = []
    for step in range(ADAMW_STEPS):
        opt.zero_grad()
        loss = model2(input_ids=input_ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - float(out["loss"])) < 1e-6 * max(1.0, abs(losses[0])), (losses[0], float(out["loss"]))
    out["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    for n, p in checkpoint_names(config.model_type, list(model2.named_parameters())):
        out["after3." + n] = f32(p)

    save_file(out, os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})
    make_generate_fixture(d, cls)

    meta = {
        "config_name": name,
        "model_class": cls.__name__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_seed": MODEL_SEED,
        "input_seed": INPUT_SEED,
        "batch": B,
        "seq": T,
        "tied": tied,
        "perturbed": perturb,
        "param_names": names,
        "adamw": ADAMW,
        "adamw_steps": ADAMW_STEPS,
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"{name}: loss={float(out['loss']):.6f} adamw_losses={[round(x, 6) for x in losses]} "
          f"params={len(names)} tensors={len(out)}")


GEN_NEW = 8


def make_generate_fixture(d, cls):
    """generate.safetensors: transformers' greedy generate (do_sample=False, no eos) of the saved model on a batch
    whose second row is left-padded, with the smallest top-1 / top-2 logit margin seen (a margin near 0 would make
    the greedy tokens depend on rounding)."""
    from transformers import GenerationConfig
    model = cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    model.config.output_router_logits = False   # MoE: transformers' generate cannot concatenate them across steps
    # plain greedy for exactly GEN_NEW tokens: no eos anywhere (min_new_tokens would instead forbid the config's eos
    # token, which is not greedy decoding)
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(INPUT_SEED + 1)
    ids = torch.randint(1, V, (2, 6), generator=gen, dtype=torch.int64)
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    gc = GenerationConfig(max_new_tokens=GEN_NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0, bos_token_id=None, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        res = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    margin = float("inf")
    for sc in res.scores:
        top2 = torch.topk(sc.float(), 2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    assert res.sequences.shape == (2, 6 + GEN_NEW), res.sequences.shape
    save_file({"input_ids": ids, "attention_mask": mask, "sequences": res.sequences.contiguous(),
               "min_margin": torch.tensor(margin, dtype=torch.float32)},
              os.path.join(d, "generate.safetensors"), metadata={"format": "pt"})
    print(f"  generate: {res.sequences.tolist()} min margin {margin:.3g}")


def grad_of(fn, inputs, dy):
    """Run fn on leaf copies of inputs, backprop dy, return (y, [grads])."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [l.grad.detach() for l in leaves]


def make_ops_fixture(out_root):
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import (
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
        rotate_half,
    )

    d = os.path.join(out_root, "ops")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    g = torch.Generator().manual_seed(42)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * scale

    out = {}
    notes = {}

    # layer_norm [3,5], eps 1e-5
    x, w, b, dy = rn(3, 5), 1.0 + 0.1 * rn(5), 0.1 * rn(5), rn(3, 5)
    y, (dx, dw, db) = grad_of(lambda x, w, b: F.layer_norm(x, (5,), w, b, eps=1e-5), [x, w, b], dy)
    out.update({"layer_norm.x": x, "layer_norm.w": w, "layer_norm.b": b, "layer_norm.y": y,
                "layer_norm.dy": dy, "layer_norm.dx": dx, "layer_norm.dw": dw, "layer_norm.db": db})
    notes["layer_norm"] = "F.layer_norm over last dim, eps=1e-5"

    # rms_norm [3,5], HF LlamaRMSNorm, eps 1e-6
    x, w, dy = rn(3, 5), 1.0 + 0.1 * rn(5), rn(3, 5)
    norm = LlamaRMSNorm(5, eps=1e-6)
    xl = x.clone().requires_grad_(True)
    with torch.no_grad():
        norm.weight.copy_(w)
    y = norm(xl)
    y.backward(dy)
    out.update({"rms_norm.x": x, "rms_norm.w": w, "rms_norm.y": y.detach(), "rms_norm.dy": dy,
                "rms_norm.dx": xl.grad.detach(), "rms_norm.dw": norm.weight.grad.detach().clone()})
    notes["rms_norm"] = "transformers LlamaRMSNorm, eps=1e-6"

    # activations [7]
    x7 = torch.tensor([-3.0, -1.5, -0.5, 0.0, 0.25, 1.0, 2.5], dtype=torch.float32)
    for key, fn, note in [
        ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), "F.gelu(approximate='tanh')"),
        ("gelu_new", lambda x: ACT2FN["gelu_new"](x), "transformers ACT2FN['gelu_new'] (GPT-2), explicit tanh formula"),
        ("gelu", lambda x: F.gelu(x), "F.gelu exact (erf)"),
        ("silu", lambda x: F.silu(x), "F.silu"),
    ]:
        dy = rn(7)
        y, (dx,) = grad_of(fn, [x7], dy)
        out.update({f"{key}.x": x7.clone(), f"{key}.y": y, f"{key}.dy": dy, f"{key}.dx": dx})
        notes[key] = note

    # softmax / log_softmax [3,5] over last dim
    x, dy = rn(3, 5, scale=2.0), rn(3, 5)
    y, (dx,) = grad_of(lambda x: F.softmax(x, dim=-1), [x], dy)
    out.update({"softmax.x": x, "softmax.y": y, "softmax.dy": dy, "softmax.dx": dx})
    x, dy = rn(3, 5, scale=2.0), rn(3, 5)
    y, (dx,) = grad_of(lambda x: F.log_softmax(x, dim=-1), [x], dy)
    out.update({"log_softmax.x": x, "log_softmax.y": y, "log_softmax.dy": dy, "log_softmax.dx": dx})
    notes["softmax"] = notes["log_softmax"] = "over last dim"

    # cross_entropy, mean over non-ignored targets
    logits = rn(4, 7, scale=2.0)
    targets = torch.tensor([3, -100, 0, 6], dtype=torch.int64)
    lg = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(lg, targets, ignore_index=-100, reduction="mean")
    loss.backward()
    out.update({"cross_entropy.logits": logits, "cross_entropy.targets": targets,
                "cross_entropy.loss": loss.detach().reshape(()), "cross_entropy.dlogits": lg.grad.detach()})
    notes["cross_entropy"] = "F.cross_entropy(ignore_index=-100, reduction='mean'); dlogits = d loss / d logits"

    # RoPE: HF rotate_half convention, theta 10000, hd 8, T 5, q [1,2,5,8]
    rcfg = LlamaConfig(hidden_size=16, num_attention_heads=2, head_dim=8, num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       max_position_embeddings=64)
    rope = LlamaRotaryEmbedding(rcfg)
    q, k, dy = rn(1, 2, 5, 8), rn(1, 2, 5, 8), rn(1, 2, 5, 8)
    pos = torch.arange(5, dtype=torch.int64).unsqueeze(0)
    cos, sin = rope(q, pos)
    ql = q.clone().requires_grad_(True)
    q_rot, k_rot = apply_rotary_pos_emb(ql, k, cos, sin)
    q_rot.backward(dy)
    # independent check against the formula in hf-models.md 0.3
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.int64).float() / 8))
    fr = torch.outer(torch.arange(5).float(), inv)
    emb = torch.cat([fr, fr], dim=-1)
    manual = q * emb.cos() + rotate_half(q) * emb.sin()
    assert torch.allclose(manual, q_rot.detach(), atol=1e-6)
    out.update({"rope.q": q, "rope.cos": cos[0].detach(), "rope.sin": sin[0].detach(),
                "rope.q_rot": q_rot.detach(), "rope.k": k, "rope.k_rot": k_rot.detach(),
                "rope.dy": dy, "rope.dq": ql.grad.detach()})
    notes["rope"] = ("theta 10000, hd 8, positions 0..4; q,k [1,2,5,8] (B,heads,T,hd); cos/sin [5,8]; "
                     "q_rot = q*cos + rotate_half(q)*sin; dq = grad of q_rot wrt q for upstream dy")

    # AdamW: 2 steps, grads g then 0.5*g
    p0, gr = rn(4, 3), rn(4, 3)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    snaps = []
    for gg in (gr, 0.5 * gr):
        p.grad = gg.clone()
        opt.step()
        snaps.append(p.detach().clone())
    out.update({"adamw.p0": p0, "adamw.g": gr, "adamw.p1": snaps[0], "adamw.p2": snaps[1]})
    notes["adamw"] = "torch.optim.AdamW(lr=1e-3, betas=(0.9,0.999), eps=1e-8, weight_decay=0.01); step1 grad g, step2 grad 0.5*g"

    # SGD momentum 0.9, lr 0.1, same p0 and grads
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=False)
    snaps = []
    for gg in (gr, 0.5 * gr):
        p.grad = gg.clone()
        opt.step()
        snaps.append(p.detach().clone())
    out.update({"sgd.p1": snaps[0], "sgd.p2": snaps[1]})
    notes["sgd"] = ("torch.optim.SGD(lr=0.1, momentum=0.9, dampening=0, weight_decay=0, nesterov=False); "
                    "start adamw.p0, step1 grad adamw.g, step2 grad 0.5*adamw.g")

    out = {k: v.contiguous() for k, v in out.items()}
    for k, v in out.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    save_file(out, os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})
    meta = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "seed": 42, "notes": notes}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"ops: {len(out)} tensors")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixtures root (default: spec/fixtures)")
    ap.add_argument("--only", nargs="*", help="subset of fixture names (and/or 'ops')")
    ap.add_argument("--generate-only", action="store_true",
                    help="only (re)write generate.safetensors of the existing model fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)  # determinism across machines
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)
    for name, cls, mk, perturb in CONFIGS:
        if args.only and name not in args.only:
            continue
        if args.generate_only:
            make_generate_fixture(os.path.join(args.out, name), cls)
        else:
            make_model_fixture(args.out, name, cls, mk, perturb)
    if args.generate_only:
        return 0
    if not args.only or "ops" in args.only:
        make_ops_fixture(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
