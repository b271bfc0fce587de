-- lua/fsdp/nn/gpt2_attention.lua: GPT-2 causal self-attention: fused c_attn (Conv1D [H, 3H], columns Q | K | V,
-- head h at columns h*hd..) and c_proj (Conv1D [H, H]). q, k and v are strided views of c_attn's output, passed
-- straight to the fused attention op: no copies. attn_pdrop drops attention probabilities inside that op in
-- training mode (the attn_dropout module holds p, as Hugging Face's holds nn.Dropout; masks: fsdp.dropout_keys).
local core    = require "fsdp.core"
local Module  = require "fsdp.nn.module"
local Conv1D  = require "fsdp.nn.conv1d"
local Dropout = require "fsdp.nn.dropout"
local basic   = require "fsdp.ops.basic"
local ops     = require "fsdp.nn.ops"
local keys    = require "fsdp.dropout_keys"

local GPT2Attention = Module.class("GPT2Attention")
local OPTS = {n_head = true, attn_pdrop = true, resid_pdrop = true, scale_attn_weights = true, layer_idx = true,
              scale_attn_by_inverse_layer_idx = true, std = true, proj_std = true, device = true, dtype = true, seed = true}

-- hidden: H; opts.n_head (required); std / proj_std: init of c_attn / c_proj weights.
function GPT2Attention.new(hidden, opts)
  opts = core.check_opts("GPT2Attention", opts, OPTS, 2)
  local nh = opts.n_head
  if type(nh) ~= "number" or nh < 1 or hidden % nh ~= 0 then
    error(("GPT2Attention: hidden size %d is not divisible by n_head %s"):format(hidden, tostring(nh)), 2)
  end
  local self = Module.init(setmetatable({}, GPT2Attention))
  self.hidden, self.n_head, self.head_dim = hidden, nh, hidden / nh
  local lopts = {device = opts.device, dtype = opts.dtype, seed = opts.seed}
  lopts.std = opts.std
  self:register_module("c_attn", Conv1D.new(hidden, 3 * hidden, lopts))
  lopts.std = opts.proj_std or opts.std
  self:register_module("c_proj", Conv1D.new(hidden, hidden, lopts))
  self:register_module("attn_dropout", Dropout.new(opts.attn_pdrop or 0))
  self:register_module("resid_dropout", Dropout.new(opts.resid_pdrop or 0))
  local scale = 1
  if opts.scale_attn_weights ~= false then scale = 1 / math.sqrt(self.head_dim) end
  if opts.scale_attn_by_inverse_layer_idx then scale = scale / ((opts.layer_idx or 0) + 1) end
  self.scale = scale
  return self
end

-- x [B, T, H] -> [B, T, H]; cache: generation (fsdp/generate.lua): k and v join it, the queries attend over it
function GPT2Attention:forward(x, cache)
  local xp = x._p
  local B, T = tonumber(xp.shape[0]), tonumber(xp.shape[1])
  local nh, hd = self.n_head, self.head_dim
  local qkv = self.c_attn(x)                          -- [B, T, 3H], columns Q | K | V
  local heads = basic.view(qkv, {B, T, 3 * nh, hd})   -- free view: [B, T, 3nH, hd]
  qkv:free()
  local q = basic.narrow(heads, 3, 1, nh)             -- [B, T, nH, hd], strided views
  local k = basic.narrow(heads, 3, nh + 1, nh)
  local v = basic.narrow(heads, 3, 2 * nh + 1, nh)
  heads:free()
  local drop = self.attn_dropout
  local p = drop.training and drop.p or 0
  local o
  if cache then o = cache:attend(self, q, k, v, self.scale, 0)
  else o = ops.attention(q, k, v, self.scale, 0, p, keys.seed(), p > 0 and keys.next() or 0) end  -- [B, T, nH, hd]
  q:free(); k:free(); v:free()
  local merged = basic.view(o, {B, T, nh * hd})
  o:free()
  local out = self.c_proj(merged)
  merged:free()
  local y = self.resid_dropout(out)
  if y ~= out then out:free() end
  return y
end

function GPT2Attention:extra_repr() return ("n_head=%d, head_dim=%d"):format(self.n_head, self.head_dim) end

return GPT2Attention
