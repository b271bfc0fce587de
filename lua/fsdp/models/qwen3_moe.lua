-- lua/fsdp/models/qwen3_moe.lua: Qwen3-MoE (Qwen3MoeForCausalLM, hf-models.md §7): Qwen3 attention (q_norm and k_norm
-- before RoPE, optional biases) and, on the layers decoder_sparse_step and mlp_only_layers select, a sparse MoE
-- block (models/qwen_moe.lua); the other layers keep a dense gated MLP of intermediate_size.
local decoder = require "fsdp.models.decoder"
local qmoe    = require "fsdp.models.qwen_moe"

local M = {
  model_type = "qwen3_moe",
  architectures = {"Qwen3MoeForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
  aliases = {num_experts = "num_local_experts"},
}

M.defaults = {
  vocab_size = 151936, hidden_size = 2048, intermediate_size = 6144, moe_intermediate_size = 768,
  num_hidden_layers = 24, num_attention_heads = 32, num_key_value_heads = 4, head_dim = nil, hidden_act = "silu",
  max_position_embeddings = 32768, initializer_range = 0.02, rms_norm_eps = 1e-6, tie_word_embeddings = false,
  rope_parameters = nil, attention_bias = false, use_sliding_window = false, sliding_window = nil,
  max_window_layers = 0, attention_dropout = 0.0, num_local_experts = 128, num_experts_per_tok = 8,
  norm_topk_prob = false, decoder_sparse_step = 1, mlp_only_layers = nil, output_router_logits = false,
  router_aux_loss_coef = 0.001, bos_token_id = nil, eos_token_id = nil, pad_token_id = nil,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true, router_aux_loss_coef = true}
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", moe_intermediate_size = "size",
  num_hidden_layers = "size", num_attention_heads = "size", num_key_value_heads = "size?", head_dim = "size?",
  hidden_act = "string", max_position_embeddings = "size", initializer_range = "nonneg", rms_norm_eps = "eps",
  tie_word_embeddings = "bool", attention_bias = "bool", use_sliding_window = "bool", sliding_window = "size?",
  attention_dropout = "prob", num_local_experts = "size", num_experts_per_tok = "size", norm_topk_prob = "bool",
  decoder_sparse_step = "size", output_router_logits = "bool", router_aux_loss_coef = "nonneg",
  bos_token_id = "token_id?", eos_token_id = "token_id?", pad_token_id = "token_id?", rope_theta = "positive?",
}
M.default_theta = 10000.0

-- Layer 0 dense, layer 1 routed over 4 experts (top-2, not renormalised).
M.tiny_config = {vocab_size = 97, hidden_size = 32, intermediate_size = 64, moe_intermediate_size = 24,
                 num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 8,
                 max_position_embeddings = 64, num_local_experts = 4, num_experts_per_tok = 2,
                 norm_topk_prob = false, decoder_sparse_step = 1, mlp_only_layers = {0}, output_router_logits = true,
                 router_aux_loss_coef = 0.02, tie_word_embeddings = false}

function M.normalize(cfg)
  cfg.num_experts = cfg.num_local_experts   -- the shared MoE code reads num_experts
  qmoe.check(cfg)
  decoder.normalize_common(cfg, M.default_theta)
  if not cfg.use_sliding_window then cfg.sliding_window = nil end
  return cfg
end

M.fused_source = qmoe.fused_source   -- fused expert checkpoints load too

M.build, M.classes = decoder.make{
  prefix = "Qwen3Moe",
  attention = function(cfg) return {bias = cfg.attention_bias, window = cfg.sliding_window or 0, qk_norm = true} end,
  mlp = function() return {bias = false} end,
  ffn = qmoe.ffn(false),
  moe = qmoe.moe,
}

return M
