-- lua/fsdp/models/gpt2.lua: GPT-2 (GPT2LMHeadModel) with Hugging Face's parameter names, shapes and Conv1D layouts
-- (hf-models.md §1), its config defaults, init, tiny test config and default FSDP plan.
local core = require "fsdp.core"
local Tensor     = require "fsdp.tensor"
local Module     = require "fsdp.nn.module"
local ModuleList = require "fsdp.nn.module_list"
local Embedding  = require "fsdp.nn.embedding"
local LayerNorm  = require "fsdp.nn.layer_norm"
local Linear     = require "fsdp.nn.linear"
local Dropout    = require "fsdp.nn.dropout"
local Attn       = require "fsdp.nn.gpt2_attention"
local MLP        = require "fsdp.nn.gpt2_mlp"
local ops        = require "fsdp.nn.ops"
local common     = require "fsdp.models.common"

local M = {
  model_type = "gpt2",
  architectures = {"GPT2LMHeadModel"},
  base_prefix = "transformer",
  tied = {["lm_head.weight"] = "transformer.wte.weight"},
  -- Default FSDP plan (data, as transformers' _fsdp_plan; format in fsdp/plan.lua): the two embeddings form one unit
  -- and each block is one, both freeing their gathered weights after forward; the final norm and the head form one
  -- unit that keeps them (backward needs them at once). Tied, the head's unit and the embeddings' merge into one.
  fsdp_plan = {
    {group = {"transformer.wte", "transformer.wpe"}, "free_full_weight"},
    ["transformer.h.*"] = "free_full_weight",
    {group = {"transformer.ln_f", "lm_head"}, "keep_full_weight"},
  },
}

M.defaults = {
  vocab_size = 50257, n_positions = 1024, n_embd = 768, n_layer = 12, n_head = 12, n_inner = nil,
  activation_function = "gelu_new", resid_pdrop = 0.1, embd_pdrop = 0.1, attn_pdrop = 0.1,
  layer_norm_epsilon = 1e-5, initializer_range = 0.02, scale_attn_weights = true,
  scale_attn_by_inverse_layer_idx = false, reorder_and_upcast_attn = false, bos_token_id = 50256,
  eos_token_id = 50256, tie_word_embeddings = true,
}
-- What each key must hold (models.config checks it, naming the key; see models/init.lua for the kinds).
M.schema = {
  vocab_size = "size", n_positions = "size", n_embd = "size", n_layer = "size", n_head = "size", n_inner = "size?",
  activation_function = "string", resid_pdrop = "prob", embd_pdrop = "prob", attn_pdrop = "prob",
  layer_norm_epsilon = "eps", initializer_range = "nonneg", scale_attn_weights = "bool",
  scale_attn_by_inverse_layer_idx = "bool", reorder_and_upcast_attn = "bool", bos_token_id = "token_id?",
  eos_token_id = "token_id?", tie_word_embeddings = "bool",
}
-- Keys written as JSON floats (Python reads 0 as int and 0.0 as float).
M.float_keys = {resid_pdrop = true, embd_pdrop = true, attn_pdrop = true, layer_norm_epsilon = true,
                initializer_range = true, summary_first_dropout = true}
-- HF attribute_map: generic names accepted as aliases.
M.aliases = {hidden_size = "n_embd", max_position_embeddings = "n_positions", num_attention_heads = "n_head",
             num_hidden_layers = "n_layer"}

M.tiny_config = {vocab_size = 101, n_positions = 32, n_embd = 32, n_layer = 2, n_head = 4, resid_pdrop = 0.0,
                 embd_pdrop = 0.0, attn_pdrop = 0.0, tie_word_embeddings = true}

local ACTS = {gelu_new = true, gelu_pytorch_tanh = true, gelu = true, silu = true, swish = true, relu = true}

function M.normalize(cfg)
  if not ACTS[cfg.activation_function] then
    core.raise(("config: gpt2: unsupported activation_function '%s' (supported: gelu_new, gelu_pytorch_tanh, gelu, silu, swish, relu)")
          :format(tostring(cfg.activation_function)))
  end
  if cfg.n_embd % cfg.n_head ~= 0 then
    core.raise(("config: gpt2: n_embd %d is not divisible by n_head %d"):format(cfg.n_embd, cfg.n_head))
  end
  -- reorder_and_upcast_attn needs nothing: the fused attention computes scores and softmax in f32 (hf-models.md §1.1).
  return cfg
end

-- ---- modules ----
local Block = Module.class("GPT2Block")

function Block.new(cfg, i, o)
  local self = Module.init(setmetatable({}, Block))
  self.is_block = true
  local H = cfg.n_embd
  local inner = cfg.n_inner or 4 * H
  local std = cfg.initializer_range
  local proj_std = std / math.sqrt(2 * cfg.n_layer)
  local eps = cfg.layer_norm_epsilon
  self:register_module("ln_1", LayerNorm.new(H, {eps = eps, device = o.device, dtype = o.dtype}))
  self:register_module("attn", Attn.new(H, {n_head = cfg.n_head, attn_pdrop = cfg.attn_pdrop, resid_pdrop = cfg.resid_pdrop,
    scale_attn_weights = cfg.scale_attn_weights, scale_attn_by_inverse_layer_idx = cfg.scale_attn_by_inverse_layer_idx,
    layer_idx = i, std = std, proj_std = proj_std, device = o.device, dtype = o.dtype, seed = o.seed}))
  self:register_module("ln_2", LayerNorm.new(H, {eps = eps, device = o.device, dtype = o.dtype}))
  self:register_module("mlp", MLP.new(H, inner, {activation = cfg.activation_function, resid_pdrop = cfg.resid_pdrop,
    std = std, proj_std = proj_std, device = o.device, dtype = o.dtype, seed = o.seed}))
  return self
end

-- x + attn(ln_1(x)), then + mlp(ln_2(.)); the residual sums are the only activations kept between blocks.
function Block:forward(x, cache)
  local a = self.ln_1(x)
  local o = self.attn(a, cache); a:free()
  local h = ops.add(x, o); o:free()
  local m = self.ln_2(h)
  local f = self.mlp(m); m:free()
  local out = ops.add(h, f); h:free(); f:free()
  return out
end

local Base = Module.class("GPT2Model")

function Base.new(cfg, o)
  local self = Module.init(setmetatable({}, Base))
  local H, std = cfg.n_embd, cfg.initializer_range
  local eo = {std = std, device = o.device, dtype = o.dtype}
  self:register_module("wte", Embedding.new(cfg.vocab_size, H, eo))
  self:register_module("wpe", Embedding.new(cfg.n_positions, H, eo))
  self:register_module("drop", Dropout.new(cfg.embd_pdrop))
  local h = ModuleList.new()
  for i = 0, cfg.n_layer - 1 do h:append(Block.new(cfg, i, o)) end
  self:register_module("h", h)
  self:register_module("ln_f", LayerNorm.new(H, {eps = cfg.layer_norm_epsilon, device = o.device, dtype = o.dtype}))
  self.n_positions = cfg.n_positions
  return self
end

function Base:forward(input_ids, cache)
  local T = input_ids:size(2)
  if T > self.n_positions then
    core.raise(("GPT2Model: sequence length %d exceeds n_positions %d"):format(T, self.n_positions))
  end
  local tok = self.wte(input_ids)          -- [B, T, H]
  local pos
  if cache then
    pos = self.wpe(cache.pos)              -- [B, T, H]: each row's own positions (generation)
  else
    local pos_ids = Tensor.arange(0, T, {dtype = "i64"})
    pos = self.wpe(pos_ids)                -- [T, H], broadcast over B
    pos_ids:free()
  end
  local x = ops.add(tok, pos); tok:free(); pos:free()
  local d = self.drop(x)
  if d ~= x then x:free(); x = d end
  x = common.run_blocks(self.h, x, cache)
  local out = self.ln_f(x); x:free()
  return out
end

local LM = Module.class("GPT2LMHeadModel")

function LM:forward(input_ids, opts)
  return common.causal_lm_forward(self, "GPT2LMHeadModel", self.transformer, input_ids, opts)
end

function LM:generate(ids, opts) return require("fsdp.generate").generate(self, ids, opts) end

-- Builds the module tree on opts.device (models/init.lua builds on meta and materialises).
function M.build(cfg, o)
  local self = Module.init(setmetatable({}, LM))
  self:register_module("transformer", Base.new(cfg, o))
  self:register_module("lm_head", Linear.new(cfg.n_embd, cfg.vocab_size,
    {bias = false, std = cfg.initializer_range, device = o.device, dtype = o.dtype}))
  if cfg.tie_word_embeddings then self.lm_head:set_parameter("weight", self.transformer.wte.weight) end
  return self
end

M.classes = {GPT2LMHeadModel = LM, GPT2Model = Base, GPT2Block = Block}
return M
