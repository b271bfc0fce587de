-- lua/fsdp/models/llama.lua: Llama (LlamaForCausalLM) with Hugging Face's parameter names and shapes
-- (hf-models.md §2): RMSNorm pre-norm layers, GQA attention with RoPE, SwiGLU MLP, optional biases. The layers are
-- the Llama family's (models/decoder.lua); this file is the config.
local decoder = require "fsdp.models.decoder"

local M = {
  model_type = "llama",
  architectures = {"LlamaForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
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

function M.normalize(cfg)
  return decoder.normalize_common(cfg, M.default_theta)
end

M.build, M.classes = decoder.make{
  prefix = "Llama",
  attention = function(cfg) return {bias = cfg.attention_bias, window = 0} end,
  mlp = function(cfg) return {bias = cfg.mlp_bias} end,
}

return M
