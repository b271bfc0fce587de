-- lua/fsdp/models/phi3.lua: Phi-3 (Phi3ForCausalLM, hf-models.md §8): the Llama family with a fused qkv_proj (rows q,
-- then k, then v) and a fused gate_up_proj (gate first), partial rotary embeddings (partial_rotary_factor), dropout
-- on both residual branches (resid_pdrop), a padding row in the embedding (pad_token_id), no biases, and an optional
-- sliding window on every layer, and the long-context variants' longrope (short and long factors, hf-models.md §0.10).
-- The layers are the Llama family's (models/decoder.lua).
local decoder = require "fsdp.models.decoder"

local M = {
  model_type = "phi3",
  architectures = {"Phi3ForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
}

-- embd_pdrop is declared by Phi3Config but not applied by transformers' Phi3Model: accepted and unused, as there.
M.defaults = {
  vocab_size = 32064, hidden_size = 3072, intermediate_size = 8192, num_hidden_layers = 32,
  num_attention_heads = 32, num_key_value_heads = nil, head_dim = nil, hidden_act = "silu",
  max_position_embeddings = 4096, original_max_position_embeddings = 4096, initializer_range = 0.02,
  rms_norm_eps = 1e-5, tie_word_embeddings = false, rope_parameters = nil, resid_pdrop = 0.0, embd_pdrop = 0.0,
  attention_dropout = 0.0, sliding_window = nil, bos_token_id = 1, eos_token_id = 32000, pad_token_id = 32000,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true, resid_pdrop = true,
                embd_pdrop = true}
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", num_hidden_layers = "size",
  num_attention_heads = "size", num_key_value_heads = "size?", head_dim = "size?", hidden_act = "string",
  max_position_embeddings = "size", original_max_position_embeddings = "size", initializer_range = "nonneg",
  rms_norm_eps = "eps", tie_word_embeddings = "bool", resid_pdrop = "prob", embd_pdrop = "prob",
  attention_dropout = "prob", sliding_window = "size?", bos_token_id = "token_id?", eos_token_id = "token_id?",
  pad_token_id = "token_id?", rope_theta = "positive?",
}
M.default_theta = 10000.0

-- Half the channels rotated, a padding row (100) and GQA 4/2 through the fused projection.
M.tiny_config = {vocab_size = 101, hidden_size = 64, intermediate_size = 96, num_hidden_layers = 2,
                 num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 64,
                 rope_parameters = {rope_type = "default", rope_theta = 10000.0, partial_rotary_factor = 0.5},
                 pad_token_id = 100, bos_token_id = 1, eos_token_id = 100, tie_word_embeddings = false}

-- Phi3Config takes rope_type default or longrope; the legacy names su and yarn mean longrope there.
local ROPE_TYPES = {default = true, longrope = true}

function M.normalize(cfg)
  local rp = cfg.rope_parameters or cfg.rope_scaling
  if type(rp) == "table" then
    local t = rp.rope_type or rp.type
    if t == "su" or t == "yarn" then
      local copy = {}
      for k, v in pairs(rp) do copy[k] = v end
      copy.type, copy.rope_type = nil, "longrope"
      if cfg.rope_parameters then cfg.rope_parameters = copy else cfg.rope_scaling = copy end
    end
  end
  return decoder.normalize_common(cfg, M.default_theta, ROPE_TYPES)
end

M.build, M.classes = decoder.make{
  prefix = "Phi3",
  attention = function(cfg) return {bias = false, window = cfg.sliding_window or 0, fused_qkv = true} end,
  mlp = function() return {bias = false, fused = true} end,
  resid_dropout = function(cfg) return cfg.resid_pdrop end,
  cache_reset_at = function(cfg) return cfg.original_max_position_embeddings end,
}

return M
