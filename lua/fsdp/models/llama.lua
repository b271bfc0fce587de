-- lua/fsdp/models/llama.lua: Llama (LlamaForCausalLM) with Hugging Face's parameter names and shapes
-- (hf-models.md §2): RMSNorm pre-norm layers, GQA attention with RoPE, SwiGLU MLP, optional biases.
local core = require "fsdp.core"
local Module     = require "fsdp.nn.module"
local ModuleList = require "fsdp.nn.module_list"
local Embedding  = require "fsdp.nn.embedding"
local RMSNorm    = require "fsdp.nn.rms_norm"
local Linear     = require "fsdp.nn.linear"
local Attention  = require "fsdp.nn.attention"
local GatedMLP   = require "fsdp.nn.gated_mlp"
local ops        = require "fsdp.nn.ops"
local common     = require "fsdp.models.common"

local M = {
  model_type = "llama",
  architectures = {"LlamaForCausalLM"},
  base_prefix = "model",
  tied = {["lm_head.weight"] = "model.embed_tokens.weight"},
  -- Default FSDP plan (format in fsdp/plan.lua): embedding and decoder layers free their gathered weights after
  -- forward; the final norm and the head share a unit that keeps them (backward needs them at once). Tied, the
  -- head's unit and the embedding's merge into one.
  fsdp_plan = {
    ["model.embed_tokens"] = "free_full_weight",
    ["model.layers.*"] = "free_full_weight",
    {group = {"model.norm", "lm_head"}, "keep_full_weight"},
  },
}

M.defaults = {
  vocab_size = 32000, hidden_size = 4096, intermediate_size = 11008, num_hidden_layers = 32,
  num_attention_heads = 32, num_key_value_heads = nil, head_dim = nil, hidden_act = "silu",
  max_position_embeddings = 2048, initializer_range = 0.02, rms_norm_eps = 1e-6, tie_word_embeddings = false,
  rope_parameters = nil, attention_bias = false, mlp_bias = false, attention_dropout = 0.0, pretraining_tp = 1,
  bos_token_id = 1, eos_token_id = 2, pad_token_id = nil,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true, rope_theta = true}
-- What each key must hold (models.config checks it, naming the key; see models/init.lua for the kinds).
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", num_hidden_layers = "size",
  num_attention_heads = "size", num_key_value_heads = "size?", head_dim = "size?", hidden_act = "string",
  max_position_embeddings = "size", initializer_range = "nonneg", rms_norm_eps = "eps", tie_word_embeddings = "bool",
  attention_bias = "bool", mlp_bias = "bool", attention_dropout = "prob", pretraining_tp = "size",
  bos_token_id = "token_id?", eos_token_id = "token_id?", pad_token_id = "token_id?", rope_theta = "positive?",
}
M.default_theta = 10000.0

M.tiny_config = {vocab_size = 101, hidden_size = 32, intermediate_size = 80, num_hidden_layers = 2,
                 num_attention_heads = 4, num_key_value_heads = 2, head_dim = 8, max_position_embeddings = 64,
                 rope_parameters = {rope_type = "default", rope_theta = 5000.0}, attention_bias = true, mlp_bias = true,
                 tie_word_embeddings = false}

local ACTS = {silu = true, swish = true, gelu = true, gelu_new = true, gelu_pytorch_tanh = true, relu = true}

-- v5 rope_parameters, or v4 rope_theta / rope_scaling, folded as transformers v5 does (hf-models.md §0.10):
-- rope_scaling is the base, theta from the dict, then top-level rope_theta, then the class default.
function M.normalize_rope(cfg, default_theta)
  local rp = {}
  local src = cfg.rope_parameters or cfg.rope_scaling
  if src ~= nil and type(src) ~= "table" then
    core.raise(("config: %s: rope_parameters must be an object, got %s"):format(cfg.model_type, type(src)))
  end
  for k, v in pairs(src or {}) do rp[k] = v end
  if rp.type ~= nil and rp.rope_type == nil then rp.rope_type = rp.type end
  rp.type = nil
  rp.rope_type = rp.rope_type or "default"
  rp.rope_theta = rp.rope_theta or cfg.rope_theta or default_theta
  if rp.rope_type ~= "default" then
    core.raise(("config: %s: rope_type '%s' is not supported (only 'default')"):format(cfg.model_type, tostring(rp.rope_type)))
  end
  for k in pairs(rp) do
    if k ~= "rope_type" and k ~= "rope_theta" and k ~= "partial_rotary_factor" then
      core.raise(("config: %s: rope parameter '%s' is not supported with rope_type 'default'"):format(cfg.model_type, k))
    end
  end
  cfg.rope_parameters = rp
  cfg.rope_theta, cfg.rope_scaling = nil, nil
end

function M.normalize(cfg)
  M.normalize_rope(cfg, M.default_theta)
  if not ACTS[cfg.hidden_act] then
    core.raise(("config: llama: unsupported hidden_act '%s' (supported: silu, swish, gelu, gelu_new, gelu_pytorch_tanh, relu)")
          :format(tostring(cfg.hidden_act)))
  end
  cfg.num_key_value_heads = cfg.num_key_value_heads or cfg.num_attention_heads
  if cfg.num_attention_heads % cfg.num_key_value_heads ~= 0 then
    core.raise(("config: llama: num_attention_heads %d is not a multiple of num_key_value_heads %d")
          :format(cfg.num_attention_heads, cfg.num_key_value_heads))
  end
  if cfg.head_dim == nil then
    if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      core.raise(("config: llama: hidden_size %d is not divisible by num_attention_heads %d")
            :format(cfg.hidden_size, cfg.num_attention_heads))
    end
    cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
  end
  if cfg.pad_token_id ~= nil then
    -- HF zeroes the pad row at init and masks its gradient (nn.Embedding padding_idx); this engine does neither.
    core.raise(("config: llama: pad_token_id = %s (an embedding padding_idx) is not supported; set it to null")
          :format(tostring(cfg.pad_token_id)))
  end
  return cfg
end

-- ---- modules ----
local Layer = Module.class("LlamaDecoderLayer")

function Layer.new(cfg, o)
  local self = Module.init(setmetatable({}, Layer))
  self.is_block = true
  local H, std = cfg.hidden_size, cfg.initializer_range
  local rp = cfg.rope_parameters
  local hd = cfg.head_dim
  self:register_module("self_attn", Attention.new(H, {num_heads = cfg.num_attention_heads,
    num_kv_heads = cfg.num_key_value_heads, head_dim = hd, bias = cfg.attention_bias, rope_theta = rp.rope_theta,
    rotary_dim = math.floor(hd * (rp.partial_rotary_factor or 1.0)), dropout = cfg.attention_dropout, std = std,
    device = o.device, dtype = o.dtype}))
  self:register_module("mlp", GatedMLP.new(H, cfg.intermediate_size, {activation = cfg.hidden_act, bias = cfg.mlp_bias,
    std = std, device = o.device, dtype = o.dtype}))
  self:register_module("input_layernorm", RMSNorm.new(H, {eps = cfg.rms_norm_eps, device = o.device, dtype = o.dtype}))
  self:register_module("post_attention_layernorm", RMSNorm.new(H, {eps = cfg.rms_norm_eps, device = o.device, dtype = o.dtype}))
  return self
end

function Layer:forward(x, pos)
  local a = self.input_layernorm(x)
  local o = self.self_attn(a, pos); a:free()
  local h = ops.add(x, o); o:free()
  local m = self.post_attention_layernorm(h)
  local f = self.mlp(m); m:free()
  local out = ops.add(h, f); h:free(); f:free()
  return out
end

local Base = Module.class("LlamaModel")

function Base.new(cfg, o)
  local self = Module.init(setmetatable({}, Base))
  self:register_module("embed_tokens", Embedding.new(cfg.vocab_size, cfg.hidden_size,
    {std = cfg.initializer_range, device = o.device, dtype = o.dtype}))
  local layers = ModuleList.new()
  for _ = 1, cfg.num_hidden_layers do layers:append(Layer.new(cfg, o)) end
  self:register_module("layers", layers)
  self:register_module("norm", RMSNorm.new(cfg.hidden_size, {eps = cfg.rms_norm_eps, device = o.device, dtype = o.dtype}))
  return self
end

function Base:forward(input_ids)
  local x = self.embed_tokens(input_ids)
  x = common.run_blocks(self.layers, x, nil)   -- positions 0..T-1
  local out = self.norm(x); x:free()
  return out
end

local LM = Module.class("LlamaForCausalLM")

function LM:forward(input_ids, opts)
  return common.causal_lm_forward(self, "LlamaForCausalLM", self.model, input_ids, opts)
end

function M.build(cfg, o)
  local self = Module.init(setmetatable({}, LM))
  self:register_module("model", Base.new(cfg, o))
  self:register_module("lm_head", Linear.new(cfg.hidden_size, cfg.vocab_size,
    {bias = false, std = cfg.initializer_range, device = o.device, dtype = o.dtype}))
  if cfg.tie_word_embeddings then self.lm_head:set_parameter("weight", self.model.embed_tokens.weight) end
  return self
end

M.classes = {LlamaForCausalLM = LM, LlamaModel = Base, LlamaDecoderLayer = Layer}
return M
