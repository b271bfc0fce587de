-- lua/fsdp/nn/ops.lua: the engine ops the nn layers and models call, bound straight to the C entry points of
-- engine/fsdp.h (fixed signatures, 0-based dims) with the layers' argument conventions. The user-facing functional
-- API with argument checks is fsdp.F (lua/fsdp/ops/*.lua); this is the layers' hot path.
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"

local C, own, ptr = core.C, Tensor.own, Tensor.ptr
local M = {}

function M.layer_norm(x, w, b, eps)
  return own(C.fl_layer_norm(ptr(x, "layer_norm", 1), w and w._p or nil, b and b._p or nil, eps), "layer_norm")
end

function M.rms_norm(x, w, eps)
  return own(C.fl_rms_norm(ptr(x, "rms_norm", 1), w and w._p or nil, eps), "rms_norm")
end

function M.gelu(x, tanh_approx) return own(C.fl_gelu(ptr(x, "gelu"), tanh_approx and true or false), "gelu") end
function M.silu(x) return own(C.fl_silu(ptr(x, "silu")), "silu") end
function M.relu(x) return own(C.fl_relu(ptr(x, "relu")), "relu") end
function M.swiglu(gate, up) return own(C.fl_swiglu(ptr(gate, "swiglu", 1), ptr(up, "swiglu", 2)), "swiglu") end
function M.mul(a, b) return own(C.fl_mul(ptr(a, "mul", 1), ptr(b, "mul", 2)), "mul") end
function M.add(a, b) return own(C.fl_add(ptr(a, "add", 1), ptr(b, "add", 2)), "add") end

function M.dropout(x, p, seed, key) return own(C.fl_dropout(ptr(x, "dropout"), p, seed, key), "dropout") end

function M.embedding(w, ids, padding_idx)
  return own(C.fl_embedding_padded(ptr(w, "embedding", 1), ptr(ids, "embedding", 2), padding_idx or -1), "embedding")
end

-- x [B, T, heads, hd]; pos nil means 0..T-1.
function M.rope(x, pos, theta, rot_dim)
  return own(C.fl_rope(ptr(x, "rope", 1), pos and pos._p or nil, theta, rot_dim), "rope")
end

-- x [B, T, heads, hd] rotated by the f32 [rot/2] frequencies inv_freq, cos and sin times scale (scaled RoPE).
function M.rope_freqs(x, pos, inv_freq, scale)
  return own(C.fl_rope_freqs(ptr(x, "rope", 1), pos and pos._p or nil, inv_freq._p, scale), "rope")
end

-- q [B, T, nH, hd], k/v [B, T, nKV, hd] (strided views allowed) -> [B, T, nH, hd] contiguous. p > 0: dropout on
-- the attention probabilities with the mask of (seed, key).
function M.attention(q, k, v, scale, window, p, seed, key)
  if p and p > 0 then
    return own(C.fl_attention_dropout(ptr(q, "attention", 1), ptr(k, "attention", 2), ptr(v, "attention", 3), scale,
                                      window or 0, p, seed, key), "attention")
  end
  return own(C.fl_attention(ptr(q, "attention", 1), ptr(k, "attention", 2), ptr(v, "attention", 3), scale, window or 0),
             "attention")
end

-- Mean cross-entropy of h [N, H] W^T (W [V, H]) over targets ~= ignore_index, never holding the [N, V] logits.
function M.linear_cross_entropy(h, w, targets, ignore_index)
  return own(C.fl_linear_cross_entropy(ptr(h, "linear_cross_entropy", 1), ptr(w, "linear_cross_entropy", 2),
                                       ptr(targets, "linear_cross_entropy", 3), ignore_index or -100), "linear_cross_entropy")
end

function M.cross_entropy(logits, targets, ignore_index)
  return own(C.fl_cross_entropy(ptr(logits, "cross_entropy", 1), ptr(targets, "cross_entropy", 2), ignore_index or -100),
             "cross_entropy")
end

-- Activations by Hugging Face name (hidden_act / activation_function); nil when unsupported.
M.activations = {
  gelu_new = function(x) return M.gelu(x, true) end,
  gelu_pytorch_tanh = function(x) return M.gelu(x, true) end,
  gelu = function(x) return M.gelu(x, false) end,
  silu = M.silu,
  swish = M.silu,
  relu = M.relu,
}

return M
