-- lua/fsdp/nn/attention.lua: Llama-family causal self-attention: q/k/v/o Linear projections (optional biases),
-- grouped-query attention (nKV kv heads shared by nH/nKV query heads each), RoPE on q and k, optional sliding
-- window, attention_dropout on the probabilities inside the fused op in training mode (masks keyed by
-- fsdp.dropout_keys). Reshapes [B, T, nH*hd] <-> [B, T, nH, hd] are free views. Variants by option: qk_norm (Qwen3:
-- RMSNorm over hd of every query and key head, before RoPE) and fused_qkv (Phi-3: one qkv_proj whose output rows
-- are q, then k, then v). rope_parameters (a normalised HF dict, with max_position_embeddings) selects a scaled
-- RoPE (fsdp/nn/rope.lua); without it the frequencies are rope_theta's.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local Linear = require "fsdp.nn.linear"
local RMSNorm = require "fsdp.nn.rms_norm"
local basic  = require "fsdp.ops.basic"
local ops    = require "fsdp.nn.ops"
local keys   = require "fsdp.dropout_keys"
local Rope   = require "fsdp.nn.rope"

local Attention = Module.class("Attention")
local OPTS = {num_heads = true, num_kv_heads = true, head_dim = true, bias = true, o_bias = true, rope_theta = true,
              rotary_dim = true, window = true, dropout = true, qk_norm = true, norm_eps = true, fused_qkv = true,
              std = true, device = true, dtype = true, seed = true, rope_parameters = true, max_position_embeddings = true}

function Attention.new(hidden, opts)
  opts = core.check_opts("Attention", opts, OPTS, 2)
  local nh = opts.num_heads
  local nkv = opts.num_kv_heads or nh
  if type(nh) ~= "number" or nh < 1 then error("Attention: num_heads is required", 2) end
  if nh % nkv ~= 0 then
    error(("Attention: num_heads %d is not a multiple of num_kv_heads %d"):format(nh, nkv), 2)
  end
  local hd = opts.head_dim or hidden / nh
  if hd ~= math.floor(hd) then error(("Attention: hidden %d / num_heads %d is not an integer head_dim"):format(hidden, nh), 2) end
  local self = Module.init(setmetatable({}, Attention))
  self.hidden, self.num_heads, self.num_kv_heads, self.head_dim = hidden, nh, nkv, hd
  self.rope_theta = opts.rope_theta or 10000.0
  self.rotary_dim = opts.rotary_dim or hd
  local rp = opts.rope_parameters
  if rp ~= nil and (rp.rope_type or "default") ~= "default" then
    self.rope = Rope.new(rp, {rot_dim = self.rotary_dim, max_position_embeddings = opts.max_position_embeddings})
  end
  self.window = opts.window or 0
  self.dropout = opts.dropout or 0
  if type(self.dropout) ~= "number" or not (self.dropout >= 0 and self.dropout < 1) then
    error(("Attention: dropout (attention_dropout) must be a number in [0, 1), got %s"):format(tostring(opts.dropout)), 2)
  end
  self.scale = 1 / math.sqrt(hd)
  local bias = opts.bias and true or false
  local o_bias = bias
  if opts.o_bias ~= nil then o_bias = opts.o_bias and true or false end
  local lo = {std = opts.std, device = opts.device, dtype = opts.dtype, seed = opts.seed}
  local function lin(i, o, b) lo.bias = b; return Linear.new(i, o, lo) end
  self.fused_qkv = opts.fused_qkv and true or false
  if self.fused_qkv then   -- Phi-3 registers o_proj first: its parameters come first in the state dict
    self:register_module("o_proj", lin(nh * hd, hidden, o_bias))
    self:register_module("qkv_proj", lin(hidden, (nh + 2 * nkv) * hd, bias))
  else
    self:register_module("q_proj", lin(hidden, nh * hd, bias))
    self:register_module("k_proj", lin(hidden, nkv * hd, bias))
    self:register_module("v_proj", lin(hidden, nkv * hd, bias))
    self:register_module("o_proj", lin(nh * hd, hidden, o_bias))
  end
  if opts.qk_norm then
    local no = {eps = opts.norm_eps, device = opts.device, dtype = opts.dtype, seed = opts.seed}
    self:register_module("q_norm", RMSNorm.new(hd, no))
    self:register_module("k_norm", RMSNorm.new(hd, no))
  end
  return self
end

-- q, k, v as [B, T, heads, hd]: three projections, or one fused projection cut by output columns.
function Attention:project(x, B, T)
  local nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
  if not self.fused_qkv then
    local q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    local qh, kh, vh = basic.view(q, {B, T, nh, hd}), basic.view(k, {B, T, nkv, hd}), basic.view(v, {B, T, nkv, hd})
    q:free(); k:free(); v:free()
    return qh, kh, vh
  end
  local qkv = self.qkv_proj(x)
  local function cut(first, heads)
    local part = basic.narrow(qkv, 3, first, heads * hd)
    local c = basic.contiguous(part); part:free()
    local h = basic.view(c, {B, T, heads, hd}); c:free()
    return h
  end
  local qh, kh, vh = cut(1, nh), cut(nh * hd + 1, nkv), cut((nh + nkv) * hd + 1, nkv)
  qkv:free()
  return qh, kh, vh
end

-- The largest position + 1 of this forward: transformers' seq_len for dynamic and longrope.
local function seq_len_of(T, pos, cache)
  if cache then return cache:max_position() + 1 end
  if not pos then return T end
  local p64 = basic.to(pos, "i64")
  local pp, m = ffi.cast("const int64_t *", p64:data_ptr()), -1
  for i = 0, p64:numel() - 1 do if tonumber(pp[i]) > m then m = tonumber(pp[i]) end end
  p64:free()
  return m + 1
end

-- x [B, T, H]; pos: optional i64 [T] positions (default 0..T-1); cache: generation (fsdp/generate.lua): the
-- positions are the cache's, k and v join it, the queries attend over it -> [B, T, H]
function Attention:forward(x, pos, cache)
  local xp = x._p
  local B, T = tonumber(xp.shape[0]), tonumber(xp.shape[1])
  local nh, hd = self.num_heads, self.head_dim
  local qh, kh, vh = self:project(x, B, T)
  if self.q_norm then
    local qn, kn = self.q_norm(qh), self.k_norm(kh)
    qh:free(); kh:free()
    qh, kh = qn, kn
  end
  local inv, scale
  if self.rope then inv, scale = self.rope:frequencies(seq_len_of(T, pos, cache)) end
  if cache then
    local qr = cache:rope(qh, self.rope_theta, self.rotary_dim, inv, scale); qh:free()
    local kr = cache:rope(kh, self.rope_theta, self.rotary_dim, inv, scale); kh:free()
    local o = cache:attend(self, qr, kr, vh, self.scale, self.window)
    qr:free(); kr:free(); vh:free()
    local merged = basic.view(o, {B, T, nh * hd}); o:free()
    local out = self.o_proj(merged); merged:free()
    return out
  end
  local qr, kr
  if inv then
    qr = ops.rope_freqs(qh, pos, inv, scale); qh:free()
    kr = ops.rope_freqs(kh, pos, inv, scale); kh:free()
  else
    qr = ops.rope(qh, pos, self.rope_theta, self.rotary_dim); qh:free()
    kr = ops.rope(kh, pos, self.rope_theta, self.rotary_dim); kh:free()
  end
  local p = self.training and self.dropout or 0
  local o = ops.attention(qr, kr, vh, self.scale, self.window, p, keys.seed(), p > 0 and keys.next() or 0)
  qr:free(); kr:free(); vh:free()
  local merged = basic.view(o, {B, T, nh * hd}); o:free()
  local out = self.o_proj(merged)
  merged:free()
  return out
end

function Attention:extra_repr()
  return ("num_heads=%d, num_kv_heads=%d, head_dim=%d, rope_theta=%g%s%s"):format(self.num_heads, self.num_kv_heads,
    self.head_dim, self.rope_theta, self.rope and (", rope_type=" .. self.rope.type) or "",
    self.window > 0 and (", window=" .. self.window) or "")
end

return Attention
