-- lua/fsdp/models/qwen3.lua: Qwen3 (Qwen3ForCausalLM, hf-models.md §5): Llama with an explicit head_dim (nH x hd need
-- not be hidden_size), RMSNorm of every query and key head (q_norm, k_norm over hd) before RoPE, optional biases on
-- q/k/v/o, and Qwen2's per-layer sliding windows. The layers are the Llama family's (models/decoder.lua).
local decoder = require "fsdp.models.decoder"

local M = {
  model_type = "qwen3",
  architectures = {"Qwen3ForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
}

M.defaults = {
  vocab_size = 151936, hidden_size = 4096, intermediate_size = 22016, num_hidden_layers = 32,
  num_attention_heads = 32, num_key_value_heads = 32, head_dim = 128, hidden_act = "silu",
  max_position_embeddings = 32768, initializer_range = 0.02, rms_norm_eps = 1e-6, tie_word_embeddings = false,
  rope_parameters = nil, attention_bias = false, use_sliding_window = false, sliding_window = 4096,
  max_window_layers = 28, layer_types = nil, attention_dropout = 0.0, bos_token_id = nil, eos_token_id = nil,
  pad_token_id = nil,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true}
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", num_hidden_layers = "size",
  num_attention_heads = "size", num_key_value_heads = "size?", head_dim = "size", hidden_act = "string",
  max_position_embeddings = "size", initializer_range = "nonneg", rms_norm_eps = "eps", tie_word_embeddings = "bool",
  attention_bias = "bool", use_sliding_window = "bool", sliding_window = "size?", max_window_layers = "nonneg",
  attention_dropout = "prob", bos_token_id = "token_id?", eos_token_id = "token_id?", pad_token_id = "token_id?",
  rope_theta = "positive?",
}
M.default_theta = 10000.0

-- head_dim 16 with hidden 48 and 4 heads: nH x hd = 64 differs from hidden_size.
M.tiny_config = {vocab_size = 101, hidden_size = 48, intermediate_size = 96, num_hidden_layers = 2,
                 num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16, max_position_embeddings = 64,
                 rope_parameters = {rope_type = "default", rope_theta = 1000000.0}, attention_bias = true,
                 tie_word_embeddings = false}

function M.normalize(cfg)
  decoder.normalize_common(cfg, M.default_theta)
  decoder.normalize_layer_types(cfg)
  return cfg
end

M.build, M.classes = decoder.make{
  prefix = "Qwen3",
  attention = function(cfg, i)
    return {bias = cfg.attention_bias, window = decoder.layer_window(cfg, i), qk_norm = true}
  end,
  mlp = function() return {bias = false} end,
}

return M
