-- lua/fsdp/ops/nn.lua: neural-network ops (norms, activations, dropout, softmax, cross-entropy, embedding,
-- RoPE, attention, top-k/gather/scatter_add) as functions for fsdp.F and, where natural, Tensor methods
-- (x:softmax(dim), x:gelu()). Dims are 1-based as in torch7 (negative counts from the end); indices the
-- engine returns or takes (topk, gather, embedding ids, targets) are 0-based like PyTorch's.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"

local C, own, ptr = core.C, Tensor.own, Tensor.ptr
local methods = Tensor.methods
local M = {}

local function num(what, name, v, default)
  if v == nil then v = default end
  if type(v) ~= "number" then core.raise(("%s: %s must be a number, got %s"):format(what, name, type(v))) end
  return v
end

-- Lua dim (1-based, negative from the end) -> C dim (0-based, negative from the end).
local function dim0(what, d)
  if type(d) ~= "number" or d == 0 or d ~= math.floor(d) then
    core.raise(("%s: dim must be a non-zero integer (1-based, negative from the end), got %s"):format(what, tostring(d)))
  end
  return d > 0 and d - 1 or d
end

local function opt_ptr(t, what, argn)
  if t == nil then return nil end
  return ptr(t, what, argn)
end

-- ---- normalisation and activations ----

-- layer_norm(x, w, b, eps = 1e-5): over the last dim; w and b may be nil.
function M.layer_norm(x, w, b, eps)
  return own(C.fl_layer_norm(ptr(x, "layer_norm", 1), opt_ptr(w, "layer_norm", 2), opt_ptr(b, "layer_norm", 3),
                             num("layer_norm", "eps", eps, 1e-5)), "layer_norm")
end

-- rms_norm(x, w, eps = 1e-6): Hugging Face order (normalise, cast back, then * w); w may be nil.
function M.rms_norm(x, w, eps)
  return own(C.fl_rms_norm(ptr(x, "rms_norm", 1), opt_ptr(w, "rms_norm", 2), num("rms_norm", "eps", eps, 1e-6)), "rms_norm")
end

-- gelu(x, approximate): approximate "none" (default, exact erf) or "tanh" (GPT-2's gelu_new,
-- torch's gelu_pytorch_tanh), as torch.nn.functional.gelu.
function M.gelu(x, approximate)
  approximate = approximate or "none"
  if approximate ~= "none" and approximate ~= "tanh" then
    error(("gelu: approximate must be 'none' or 'tanh', got %s"):format(tostring(approximate)), 2)
  end
  return own(C.fl_gelu(ptr(x, "gelu"), approximate == "tanh"), "gelu")
end

function M.gelu_new(x) return own(C.fl_gelu(ptr(x, "gelu_new"), true), "gelu_new") end
function M.silu(x) return own(C.fl_silu(ptr(x, "silu")), "silu") end

-- swiglu(gate, up) = silu(gate) * up, fused (Llama's MLP).
function M.swiglu(gate, up) return own(C.fl_swiglu(ptr(gate, "swiglu", 1), ptr(up, "swiglu", 2)), "swiglu") end

-- dropout(x, p, seed, key): element i kept iff uniform(seed, key, i) >= p, kept values scaled by 1/(1-p).
-- The mask is a function of (seed, key, i) only: pass a different key per call site and step. p = 0
-- returns x itself.
function M.dropout(x, p, seed, key)
  p = num("dropout", "p", p)
  if p < 0 or p > 1 then error(("dropout: p must be in [0, 1], got %g"):format(p), 2) end
  if type(seed) ~= "number" and type(seed) ~= "cdata" then error("dropout: seed must be a number", 2) end
  if type(key) ~= "number" and type(key) ~= "cdata" then error("dropout: key must be a number", 2) end
  return own(C.fl_dropout(ptr(x, "dropout"), p, seed, key), "dropout")
end

-- ---- softmax and losses ----

function M.softmax(x, dim) return own(C.fl_softmax(ptr(x, "softmax"), dim0("softmax", dim or -1)), "softmax") end
function M.log_softmax(x, dim) return own(C.fl_log_softmax(ptr(x, "log_softmax"), dim0("log_softmax", dim or -1)), "log_softmax") end

-- cross_entropy(logits [N, C], targets [N] i64 (0-based classes), ignore_index = -100): mean over the
-- rows whose target is not ignore_index.
function M.cross_entropy(logits, targets, ignore_index)
  return own(C.fl_cross_entropy(ptr(logits, "cross_entropy", 1), ptr(targets, "cross_entropy", 2),
                                num("cross_entropy", "ignore_index", ignore_index, -100)), "cross_entropy")
end

-- ---- embedding, RoPE, attention ----

-- embedding(weight [V, H], ids (i64/i32, 0-based, any shape), padding_idx) -> [..., H]; row padding_idx (0-based,
-- as torch's) gets no gradient.
function M.embedding(weight, ids, padding_idx)
  return own(C.fl_embedding_padded(ptr(weight, "embedding", 1), ptr(ids, "embedding", 2), padding_idx or -1), "embedding")
end

-- rope(x [B, T, heads, hd], pos (i64 [T] or nil for 0..T-1), theta = 10000, rot_dim = hd)
function M.rope(x, pos, theta, rot_dim)
  local p = ptr(x, "rope", 1)
  local hd = p.ndim == 4 and tonumber(p.shape[3]) or 0
  return own(C.fl_rope(p, opt_ptr(pos, "rope", 2), num("rope", "theta", theta, 10000), num("rope", "rot_dim", rot_dim, hd)), "rope")
end

-- attention(q [B, T, nH, hd], k, v [B, T, nKV, hd], scale = 1/sqrt(hd), window = 0): causal SDPA with GQA;
-- window > 0 keeps keys i - window < j <= i. Returns [B, T, nH, hd].
function M.attention(q, k, v, scale, window)
  local p = ptr(q, "attention", 1)
  local hd = p.ndim == 4 and tonumber(p.shape[3]) or 1
  return own(C.fl_attention(p, ptr(k, "attention", 2), ptr(v, "attention", 3), num("attention", "scale", scale, 1 / math.sqrt(hd)),
                            num("attention", "window", window, 0)), "attention")
end

-- attention_dropout(q, k, v, scale, window, p, seed, key): the same with dropout on the attention probabilities,
-- as torch eager: probability (b, h, i, j) kept iff the uniform of (seed, key, b, h, i, j) is >= p, kept values
-- scaled by 1/(1-p); the softmax normalisation is of the un-dropped probabilities. p = 0 is attention().
function M.attention_dropout(q, k, v, scale, window, p, seed, key)
  local qp = ptr(q, "attention_dropout", 1)
  local hd = qp.ndim == 4 and tonumber(qp.shape[3]) or 1
  p = num("attention_dropout", "p", p)
  if not (p >= 0 and p < 1) then error(("attention_dropout: p must be in [0, 1), got %g"):format(p), 2) end
  if type(seed) ~= "number" and type(seed) ~= "cdata" then error("attention_dropout: seed must be a number", 2) end
  if type(key) ~= "number" and type(key) ~= "cdata" then error("attention_dropout: key must be a number", 2) end
  return own(C.fl_attention_dropout(qp, ptr(k, "attention_dropout", 2), ptr(v, "attention_dropout", 3),
                                    num("attention_dropout", "scale", scale, 1 / math.sqrt(hd)),
                                    num("attention_dropout", "window", window, 0), p, seed, key), "attention_dropout")
end

-- ---- indexing for MoE ----

local idx_out = ffi.new("fl_tensor *[1]")

-- topk(x, k): the k largest along the last dim, descending; returns values and i64 indices (0-based).
function M.topk(x, k)
  idx_out[0] = nil
  local v = own(C.fl_topk(ptr(x, "topk"), num("topk", "k", k), idx_out), "topk")
  local i = Tensor.wrap(idx_out[0])
  idx_out[0] = nil
  return v, i
end

-- gather(x, dim, index): out[..i..] = x[.. index[..i..] ..] along dim (index 0-based, i64/i32).
function M.gather(x, dim, index)
  return own(C.fl_gather(ptr(x, "gather", 1), dim0("gather", dim), ptr(index, "gather", 3)), "gather")
end

-- scatter_add(base, dim, index, src): a copy of base with src added at index along dim.
function M.scatter_add(base, dim, index, src)
  return own(C.fl_scatter_add(ptr(base, "scatter_add", 1), dim0("scatter_add", dim), ptr(index, "scatter_add", 3),
                              ptr(src, "scatter_add", 4)), "scatter_add")
end

for _, name in ipairs {"softmax", "log_softmax", "gelu", "silu", "dropout", "topk", "gather", "scatter_add"} do
  methods[name] = M[name]
end

return M
