-- lua/fsdp/models/qwen2.lua: Qwen2 (Qwen2ForCausalLM, hf-models.md §4): Llama with biases on q, k and v (never on
-- o or the MLP), and sliding-window attention per layer (layer_types, or layers >= max_window_layers when
-- use_sliding_window). The layers are the Llama family's (models/decoder.lua).
local decoder = require "fsdp.models.decoder"

local M = {
  model_type = "qwen2",
  architectures = {"Qwen2ForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
}

M.defaults = {
  vocab_size = 151936, hidden_size = 4096, intermediate_size = 22016, num_hidden_layers = 32,
  num_attention_heads = 32, num_key_value_heads = 32, hidden_act = "silu", max_position_embeddings = 32768,
  initializer_range = 0.02, rms_norm_eps = 1e-6, tie_word_embeddings = false, rope_parameters = nil,
  use_sliding_window = false, sliding_window = 4096, max_window_layers = 28, layer_types = nil,
  attention_dropout = 0.0, bos_token_id = nil, eos_token_id = nil, pad_token_id = nil,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true}
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", num_hidden_layers = "size",
  num_attention_heads = "size", num_key_value_heads = "size?", hidden_act = "string",
  max_position_embeddings = "size", initializer_range = "nonneg", rms_norm_eps = "eps", tie_word_embeddings = "bool",
  use_sliding_window = "bool", sliding_window = "size?", max_window_layers = "nonneg", attention_dropout = "prob",
  bos_token_id = "token_id?", eos_token_id = "token_id?", pad_token_id = "token_id?", rope_theta = "positive?",
}
M.default_theta = 10000.0

-- Layer 0 full attention, layer 1 a window of 4: both mask kinds in one model.
M.tiny_config = {vocab_size = 97, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2,
                 num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 64,
                 rope_parameters = {rope_type = "default", rope_theta = 1000000.0}, use_sliding_window = true,
                 sliding_window = 4, max_window_layers = 1, tie_word_embeddings = false}

function M.normalize(cfg)
  cfg.head_dim = nil   -- Qwen2 has no head_dim key: hidden_size / num_attention_heads
  decoder.normalize_common(cfg, M.default_theta)
  decoder.normalize_layer_types(cfg)
  return cfg
end

M.build, M.classes = decoder.make{
  prefix = "Qwen2",
  attention = function(cfg, i) return {bias = true, o_bias = false, window = decoder.layer_window(cfg, i)} end,
  mlp = function() return {bias = false} end,
}

return M
