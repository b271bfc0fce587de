-- lua/fsdp/models/qwen2_moe.lua: Qwen2-MoE (Qwen2MoeForCausalLM): Qwen2 attention (biases on q, k, v when qkv_bias,
-- never on o; per-layer sliding windows) and, on the layers decoder_sparse_step and mlp_only_layers select, a sparse
-- MoE block (models/qwen_moe.lua) plus a shared expert of shared_expert_intermediate_size scaled by
-- sigmoid(shared_expert_gate(x)); the other layers keep a dense gated MLP of intermediate_size.
local decoder = require "fsdp.models.decoder"
local qmoe    = require "fsdp.models.qwen_moe"

local M = {
  model_type = "qwen2_moe",
  architectures = {"Qwen2MoeForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
}

M.defaults = {
  vocab_size = 151936, hidden_size = 2048, intermediate_size = 5632, moe_intermediate_size = 1408,
  shared_expert_intermediate_size = 5632, num_hidden_layers = 24, num_attention_heads = 16, num_key_value_heads = 16,
  hidden_act = "silu", max_position_embeddings = 32768, initializer_range = 0.02, rms_norm_eps = 1e-6,
  tie_word_embeddings = false, rope_parameters = nil, qkv_bias = true, use_sliding_window = false,
  sliding_window = 4096, max_window_layers = 28, layer_types = nil, attention_dropout = 0.0, num_experts = 60,
  num_experts_per_tok = 4, norm_topk_prob = false, decoder_sparse_step = 1, mlp_only_layers = nil,
  output_router_logits = false, router_aux_loss_coef = 0.001, bos_token_id = nil, eos_token_id = nil,
  pad_token_id = nil,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true, router_aux_loss_coef = true}
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", moe_intermediate_size = "size",
  shared_expert_intermediate_size = "size", num_hidden_layers = "size", num_attention_heads = "size",
  num_key_value_heads = "size?", hidden_act = "string", max_position_embeddings = "size",
  initializer_range = "nonneg", rms_norm_eps = "eps", tie_word_embeddings = "bool", qkv_bias = "bool",
  use_sliding_window = "bool", max_window_layers = "nonneg", attention_dropout = "prob", num_experts = "size",
  num_experts_per_tok = "size", norm_topk_prob = "bool", decoder_sparse_step = "size",
  output_router_logits = "bool", router_aux_loss_coef = "nonneg", bos_token_id = "token_id?",
  eos_token_id = "token_id?", pad_token_id = "token_id?", rope_theta = "positive?",
}
M.default_theta = 10000.0

-- Layer 0 dense, layer 1 routed over 4 experts (top-2, renormalised) with a shared expert.
M.tiny_config = {vocab_size = 97, hidden_size = 32, intermediate_size = 64, moe_intermediate_size = 24,
                 shared_expert_intermediate_size = 40, num_hidden_layers = 2, num_attention_heads = 4,
                 num_key_value_heads = 2, max_position_embeddings = 64, num_experts = 4, num_experts_per_tok = 2,
                 norm_topk_prob = true, decoder_sparse_step = 1, mlp_only_layers = {0}, output_router_logits = true,
                 router_aux_loss_coef = 0.02, tie_word_embeddings = false}

function M.normalize(cfg)
  cfg.head_dim = nil   -- no head_dim key: hidden_size / num_attention_heads
  qmoe.check(cfg)
  if cfg.sliding_window == 0 then cfg.sliding_window = nil end
  decoder.normalize_common(cfg, M.default_theta)
  decoder.normalize_layer_types(cfg)
  return cfg
end

M.fused_source = qmoe.fused_source   -- fused expert checkpoints load too

M.build, M.classes = decoder.make{
  prefix = "Qwen2Moe",
  attention = function(cfg, i) return {bias = cfg.qkv_bias, o_bias = false, window = decoder.layer_window(cfg, i)} end,
  mlp = function() return {bias = false} end,
  ffn = qmoe.ffn(true),
  moe = qmoe.moe,
}

return M
