-- lua/fsdp/models/decoder.lua: the Llama-family causal LM that Llama, Mistral, Qwen2, Qwen3 and Phi-3 share
-- (hf-models.md §0.4–§0.6): embed_tokens, pre-norm decoder layers (RMSNorm, GQA attention with RoPE, gated MLP),
-- the final norm and lm_head, with HF's names. An architecture file gives its config handling and a `traits`
-- table saying how it differs; this file builds the classes (named as transformers names them) from it:
--   traits.prefix                 class names: <prefix>ForCausalLM, <prefix>Model, <prefix>DecoderLayer
--   traits.attention(cfg, i)      options of layer i's nn.Attention beyond the shapes: bias, o_bias, window,
--                                 qk_norm, fused_qkv
--   traits.mlp(cfg)               options of nn.GatedMLP: bias, fused
--   traits.resid_dropout(cfg)     dropout on both branch outputs before the residual add (Phi-3), or nil
--   traits.ffn(cfg, i, o)         the feed-forward of layer i other than the gated MLP: returns its name and module
--                                 (an MoE block), or nil for the gated MLP under "mlp"
--   traits.cache_reset_at(cfg)    a length L: generate recomputes its cache once, at the first forward of more than L
--                                 tokens (transformers' Phi-3 prepare_inputs_for_generation, for longrope)
--   traits.class_names            transformers' names of the shared nn classes where they are not <prefix>Attention,
--                                 <prefix>MLP (GatedMLP and MoE experts), <prefix>RMSNorm, <prefix>SparseMoeBlock
--   traits.moe(cfg)               {num_experts =, top_k =, coef =} when the model routes: forward then collects
--                                 every MoE block's router logits and returns aux_loss (added to the loss, times
--                                 router_aux_loss_coef, when cfg.output_router_logits), as transformers' MoE LMs
-- The config keys every family member shares are normalised by M.normalize_common.
local core       = require "fsdp.core"
local Module     = require "fsdp.nn.module"
local ModuleList = require "fsdp.nn.module_list"
local Embedding  = require "fsdp.nn.embedding"
local RMSNorm    = require "fsdp.nn.rms_norm"
local Linear     = require "fsdp.nn.linear"
local Dropout    = require "fsdp.nn.dropout"
local Attention  = require "fsdp.nn.attention"
local GatedMLP   = require "fsdp.nn.gated_mlp"
local MoE        = require "fsdp.nn.moe"
local Rope       = require "fsdp.nn.rope"
local basic      = require "fsdp.ops.basic"
local ops        = require "fsdp.nn.ops"
local common     = require "fsdp.models.common"

local M = {}

-- What every member's default FSDP plan is (format in fsdp/parallel/plan.lua): embedding and decoder layers free
-- their gathered weights after forward; the final norm and the head share a unit that keeps them (backward needs
-- them at once). Tied, the head's unit and the embedding's merge into one.
M.fsdp_plan = {
  ["model.embed_tokens"] = "free_full_weight",
  ["model.layers.*"] = "free_full_weight",
  {group = {"model.norm", "lm_head"}, "keep_full_weight"},
}
M.tied = {["lm_head.weight"] = "model.embed_tokens.weight"}

local ACTS = {silu = true, swish = true, gelu = true, gelu_new = true, gelu_pytorch_tanh = true, relu = true}

-- v5 rope_parameters, or v4 rope_theta / rope_scaling, folded as transformers v5 does (hf-models.md §0.10):
-- rope_scaling is the base, theta from the dict, then top-level rope_theta, then the class default.
-- A top-level partial_rotary_factor (v4 Phi-3 configs) moves into it too. The scaled types (fsdp/nn/rope.lua) take
-- the keys transformers' validation takes; llama3, yarn and longrope get original_max_position_embeddings from a
-- top-level key of that name (Phi-3's), else from the dict, else max_position_embeddings, as standardize_rope_params.
-- types: the rope types the architecture accepts (nil: all of Rope.KEYS).
function M.normalize_rope(cfg, default_theta, types)
  local mt = cfg.model_type
  local rp = {}
  local src = cfg.rope_parameters or cfg.rope_scaling
  if src ~= nil and type(src) ~= "table" then
    core.raise(("config: %s: rope_parameters must be an object, got %s"):format(mt, type(src)))
  end
  for k, v in pairs(src or {}) do rp[k] = v end
  if rp.type ~= nil and rp.rope_type == nil then rp.rope_type = rp.type end
  rp.type = nil
  rp.rope_type = rp.rope_type or "default"
  rp.rope_theta = rp.rope_theta or cfg.rope_theta or default_theta
  if rp.partial_rotary_factor == nil then rp.partial_rotary_factor = cfg.partial_rotary_factor end
  local t = rp.rope_type
  local valid = {}
  for name in pairs(types or Rope.KEYS) do valid[#valid + 1] = name end
  table.sort(valid)
  local keys = Rope.KEYS[t]
  if not keys or (types and not types[t]) then
    core.raise(("config: %s: rope_type '%s' is not supported (valid: %s)"):format(mt, tostring(t), table.concat(valid, ", ")))
  end
  if keys.original_max_position_embeddings then
    rp.original_max_position_embeddings = cfg.original_max_position_embeddings or rp.original_max_position_embeddings
                                          or cfg.max_position_embeddings
  end
  for k in pairs(rp) do
    if k ~= "rope_type" and k ~= "rope_theta" and k ~= "partial_rotary_factor" and keys[k] == nil then
      core.raise(("config: %s: rope parameter '%s' is not supported with rope_type '%s'"):format(mt, k, t))
    end
  end
  for k, required in pairs(keys) do
    if required and rp[k] == nil then
      core.raise(("config: %s: rope_type '%s' needs rope parameter '%s'"):format(mt, t, k))
    end
  end
  local function positive(k, at_least)
    local v = rp[k]
    if v ~= nil and not (type(v) == "number" and v >= at_least and (at_least > 0 or v > 0)) then
      core.raise(("config: %s: rope parameter '%s' must be a number %s, got %s"):format(mt, k,
                 at_least > 0 and (">= " .. at_least) or "> 0", tostring(v)))
    end
  end
  if not (type(rp.rope_theta) == "number" and rp.rope_theta > 0) then
    core.raise(("config: %s: rope_theta must be a positive number, got %s"):format(mt, tostring(rp.rope_theta)))
  end
  positive("factor", 0)
  positive("attention_factor", 0)
  positive("low_freq_factor", 0)
  positive("high_freq_factor", 0)
  positive("beta_fast", 0)
  positive("beta_slow", 0)
  local om = rp.original_max_position_embeddings
  if om ~= nil and not (type(om) == "number" and om >= 1 and om == math.floor(om)) then
    core.raise(("config: %s: original_max_position_embeddings must be a positive integer, got %s"):format(mt, tostring(om)))
  end
  if t == "llama3" and rp.high_freq_factor <= rp.low_freq_factor then
    core.raise(("config: %s: llama3 high_freq_factor %g must exceed low_freq_factor %g"):format(mt,
               rp.high_freq_factor, rp.low_freq_factor))
  end
  local f = rp.partial_rotary_factor
  if f ~= nil and not (type(f) == "number" and f > 0 and f <= 1) then
    core.raise(("config: %s: partial_rotary_factor must be a number in (0, 1], got %s"):format(mt, tostring(f)))
  end
  if t == "longrope" then
    local hd = cfg.head_dim or (cfg.hidden_size / cfg.num_attention_heads)
    local n = math.floor(hd * (f or 1)) / 2
    for _, k in ipairs {"short_factor", "long_factor"} do
      local list = rp[k]
      local ok = type(list) == "table" and #list == n
      for i = 1, ok and n or 0 do if type(list[i]) ~= "number" or list[i] <= 0 then ok = false end end
      if not ok then
        core.raise(("config: %s: longrope %s must list %d positive numbers (rotary dim / 2), got %s"):format(mt, k, n,
                   type(list) == "table" and (#list .. " entries") or tostring(list)))
      end
    end
  end
  cfg.rope_parameters = rp
  cfg.rope_theta, cfg.rope_scaling, cfg.partial_rotary_factor = nil, nil, nil
end

-- The keys the family shares: RoPE, the activation, GQA heads, head_dim, the padding row.
function M.normalize_common(cfg, default_theta, rope_types)
  local mt = cfg.model_type
  M.normalize_rope(cfg, default_theta, rope_types)
  if not ACTS[cfg.hidden_act] then
    core.raise(("config: %s: unsupported hidden_act '%s' (supported: silu, swish, gelu, gelu_new, gelu_pytorch_tanh, relu)")
          :format(mt, tostring(cfg.hidden_act)))
  end
  cfg.num_key_value_heads = cfg.num_key_value_heads or cfg.num_attention_heads
  if cfg.num_attention_heads % cfg.num_key_value_heads ~= 0 then
    core.raise(("config: %s: num_attention_heads %d is not a multiple of num_key_value_heads %d")
          :format(mt, cfg.num_attention_heads, cfg.num_key_value_heads))
  end
  if cfg.head_dim == nil then
    if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      core.raise(("config: %s: hidden_size %d is not divisible by num_attention_heads %d")
            :format(mt, cfg.hidden_size, cfg.num_attention_heads))
    end
    cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
  end
  local rot = cfg.head_dim * (cfg.rope_parameters.partial_rotary_factor or 1)
  if math.floor(rot) % 2 ~= 0 then
    core.raise(("config: %s: head_dim %d x partial_rotary_factor %g gives %d rotary channels, which must be even")
          :format(mt, cfg.head_dim, cfg.rope_parameters.partial_rotary_factor or 1, math.floor(rot)))
  end
  local pad = cfg.pad_token_id
  if pad ~= nil and (type(pad) ~= "number" or pad >= cfg.vocab_size) then
    -- HF makes it the embedding's padding_idx: one row, inside the vocabulary
    core.raise(("config: %s: pad_token_id must be one token id below vocab_size %d, got %s")
          :format(mt, cfg.vocab_size, type(pad) == "table" and "a list" or tostring(pad)))
  end
  return cfg
end

-- Qwen2/Qwen3 per-layer attention kinds (hf-models.md §4.1): layer_types, or derived from use_sliding_window and
-- max_window_layers (layers at index >= max_window_layers slide).
function M.normalize_layer_types(cfg)
  local n = cfg.num_hidden_layers
  if not cfg.use_sliding_window then cfg.sliding_window = nil end
  if cfg.layer_types == nil then
    local lt = {}
    for i = 1, n do
      lt[i] = (cfg.sliding_window ~= nil and i - 1 >= cfg.max_window_layers) and "sliding_attention" or "full_attention"
    end
    cfg.layer_types = lt
  end
  if type(cfg.layer_types) ~= "table" or #cfg.layer_types ~= n then
    core.raise(("config: %s: layer_types must list %d entries (one per layer)"):format(cfg.model_type, n))
  end
  for i, t in ipairs(cfg.layer_types) do
    if t ~= "full_attention" and t ~= "sliding_attention" then
      core.raise(("config: %s: layer_types[%d] is '%s' (valid: full_attention, sliding_attention)"):format(cfg.model_type, i, tostring(t)))
    end
    if t == "sliding_attention" and cfg.sliding_window == nil then
      core.raise(("config: %s: layer %d is sliding_attention but sliding_window is null"):format(cfg.model_type, i - 1))
    end
  end
end

-- The window of layer i (1-based) under layer_types: 0 = full causal attention.
function M.layer_window(cfg, i)
  return cfg.layer_types[i] == "sliding_attention" and cfg.sliding_window or 0
end

-- make(traits) -> build(cfg, o), classes: the three classes of one architecture.
function M.make(traits)
  local Layer = Module.class(traits.prefix .. "DecoderLayer")
  local Base = Module.class(traits.prefix .. "Model")
  local LM = Module.class(traits.prefix .. "ForCausalLM")

  function Layer.new(cfg, i, o)
    local self = Module.init(setmetatable({}, Layer))
    self.is_block = true
    local H, std, rp, hd = cfg.hidden_size, cfg.initializer_range, cfg.rope_parameters, cfg.head_dim
    local a = traits.attention(cfg, i)
    self:register_module("self_attn", Attention.new(H, {num_heads = cfg.num_attention_heads,
      num_kv_heads = cfg.num_key_value_heads, head_dim = hd, bias = a.bias, o_bias = a.o_bias, window = a.window,
      qk_norm = a.qk_norm, norm_eps = cfg.rms_norm_eps, fused_qkv = a.fused_qkv, rope_theta = rp.rope_theta,
      rotary_dim = math.floor(hd * (rp.partial_rotary_factor or 1.0)), rope_parameters = rp,
      max_position_embeddings = cfg.max_position_embeddings, dropout = cfg.attention_dropout, std = std,
      device = o.device, dtype = o.dtype}))
    local ffn_name, ffn = nil, nil
    if traits.ffn then ffn_name, ffn = traits.ffn(cfg, i, o) end
    if ffn then
      self.ffn_name = ffn_name
      self:register_module(ffn_name, ffn)
    else
      local m = traits.mlp(cfg)
      self.ffn_name = "mlp"
      self:register_module("mlp", GatedMLP.new(H, cfg.intermediate_size, {activation = cfg.hidden_act, bias = m.bias,
        fused = m.fused, std = std, device = o.device, dtype = o.dtype}))
    end
    self:register_module("input_layernorm", RMSNorm.new(H, {eps = cfg.rms_norm_eps, device = o.device, dtype = o.dtype}))
    self:register_module("post_attention_layernorm", RMSNorm.new(H, {eps = cfg.rms_norm_eps, device = o.device, dtype = o.dtype}))
    local p = traits.resid_dropout and traits.resid_dropout(cfg) or 0
    if p > 0 then
      self:register_module("resid_attn_dropout", Dropout.new(p))
      self:register_module("resid_mlp_dropout", Dropout.new(p))
    end
    return self
  end

  local function residual(x, branch, drop)
    if drop then
      local d = drop(branch)
      if d ~= branch then branch:free() end
      branch = d
    end
    local h = ops.add(x, branch); branch:free()
    return h
  end

  function Layer:forward(x, pos, cache)
    local a = self.input_layernorm(x)
    local h = residual(x, self.self_attn(a, pos, cache), self.resid_attn_dropout); a:free()
    local m = self.post_attention_layernorm(h)
    local out = residual(h, self[self.ffn_name](m), self.resid_mlp_dropout); m:free(); h:free()
    return out
  end

  function Base.new(cfg, o)
    local self = Module.init(setmetatable({}, Base))
    self:register_module("embed_tokens", Embedding.new(cfg.vocab_size, cfg.hidden_size,
      {std = cfg.initializer_range, padding_idx = cfg.pad_token_id, device = o.device, dtype = o.dtype}))
    local layers = ModuleList.new()
    for i = 1, cfg.num_hidden_layers do layers:append(Layer.new(cfg, i, o)) end
    self:register_module("layers", layers)
    self:register_module("norm", RMSNorm.new(cfg.hidden_size, {eps = cfg.rms_norm_eps, device = o.device, dtype = o.dtype}))
    return self
  end

  function Base:forward(input_ids, cache)
    local x = self.embed_tokens(input_ids)
    x = common.run_blocks(self.layers, x, nil, cache)   -- positions 0..T-1, or the cache's
    local out = self.norm(x); x:free()
    return out
  end

  -- how the model prints (nn.Module's tree): the shared nn classes under transformers' names for this family
  local P = traits.prefix
  local class_names = {Attention = P .. "Attention", GatedMLP = P .. "MLP", RMSNorm = P .. "RMSNorm",
                       SparseMoeBlock = P .. "SparseMoeBlock", MoEExpert = P .. "MLP"}
  for k, v in pairs(traits.class_names or {}) do class_names[k] = v end

  local lm_name = traits.prefix .. "ForCausalLM"
  if traits.moe then
    local MOE_OPTS = {labels = true, logits = true, output_router_logits = true, cache = true, last_only = true}
    function LM:forward(input_ids, opts)
      opts = core.check_opts(lm_name, opts, MOE_OPTS, 2)
      local cfg = self.config
      local out = common.causal_lm_forward(self, lm_name, self.model, input_ids, {labels = opts.labels,
                                           logits = opts.logits, cache = opts.cache, last_only = opts.last_only})
      local want = opts.output_router_logits
      if want == nil then want = cfg.output_router_logits end
      local blocks = {}
      local layers = self.model.layers
      for i = 1, layers.n do
        local b = layers[i][layers[i].ffn_name]
        if rawget(b, "router_logits") then blocks[#blocks + 1] = b end
      end
      if want then
        local moe = traits.moe(cfg)
        out.aux_loss = MoE.aux_loss(blocks, moe.num_experts, moe.top_k)
        if out.loss then
          local scaled = basic.mul(out.aux_loss, moe.coef)
          local total = ops.add(out.loss, scaled); scaled:free(); out.loss:free()
          out.loss = total
        end
      end
      for _, b in ipairs(blocks) do MoE.drop_router_logits(b) end
      return out
    end
  else
    function LM:forward(input_ids, opts)
      return common.causal_lm_forward(self, lm_name, self.model, input_ids, opts)
    end
  end

  LM.generate = function(self, ids, opts) return require("fsdp.generate").generate(self, ids, opts) end

  local function build(cfg, o)
    local self = Module.init(setmetatable({}, LM))
    rawset(self, "_class_names", class_names)
    if traits.cache_reset_at then rawset(self, "cache_reset_at", traits.cache_reset_at(cfg)) end
    self:register_module("model", Base.new(cfg, o))
    self:register_module("lm_head", Linear.new(cfg.hidden_size, cfg.vocab_size,
      {bias = false, std = cfg.initializer_range, device = o.device, dtype = o.dtype}))
    if cfg.tie_word_embeddings then self.lm_head:set_parameter("weight", self.model.embed_tokens.weight) end
    return self
  end

  return build, {[lm_name] = LM, [traits.prefix .. "Model"] = Base, [traits.prefix .. "DecoderLayer"] = Layer}
end

return M
