-- lua/fsdp/models/mistral.lua: Mistral (MistralForCausalLM, hf-models.md §3): Llama without biases, with a sliding
-- window on every layer when sliding_window is set (query i sees keys i - W < j <= i). The layers are the Llama
-- family's (models/decoder.lua).
local decoder = require "fsdp.models.decoder"

local M = {
  model_type = "mistral",
  architectures = {"MistralForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
}

M.defaults = {
  vocab_size = 32000, hidden_size = 4096, intermediate_size = 14336, num_hidden_layers = 32,
  num_attention_heads = 32, num_key_value_heads = 8, head_dim = nil, hidden_act = "silu",
  max_position_embeddings = 4096 * 32, initializer_range = 0.02, rms_norm_eps = 1e-6, tie_word_embeddings = false,
  rope_parameters = nil, sliding_window = 4096, attention_dropout = 0.0, bos_token_id = 1, eos_token_id = 2,
  pad_token_id = nil,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true}
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", num_hidden_layers = "size",
  num_attention_heads = "size", num_key_value_heads = "size?", head_dim = "size?", hidden_act = "string",
  max_position_embeddings = "size", initializer_range = "nonneg", rms_norm_eps = "eps", tie_word_embeddings = "bool",
  sliding_window = "size?", attention_dropout = "prob", bos_token_id = "token_id?", eos_token_id = "token_id?",
  pad_token_id = "token_id?", rope_theta = "positive?",
}
M.default_theta = 10000.0

-- A window of 4 over 12-token fixtures: the mask's boundary is inside every sequence.
M.tiny_config = {vocab_size = 101, hidden_size = 32, intermediate_size = 80, num_hidden_layers = 2,
                 num_attention_heads = 4, num_key_value_heads = 2, head_dim = 8, max_position_embeddings = 64,
                 rope_parameters = {rope_type = "default", rope_theta = 5000.0}, sliding_window = 4,
                 tie_word_embeddings = false}

function M.normalize(cfg) return decoder.normalize_common(cfg, M.default_theta) end

M.build, M.classes = decoder.make{
  prefix = "Mistral",
  attention = function(cfg) return {bias = false, window = cfg.sliding_window or 0} end,
  mlp = function() return {bias = false} end,
}

return M
