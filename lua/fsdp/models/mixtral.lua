-- lua/fsdp/models/mixtral.lua: Mixtral (MixtralForCausalLM, hf-models.md §6, §9): Mistral attention (no biases, optional
-- sliding window, RoPE theta 1e6) and in every layer a sparse MoE block `block_sparse_moe` — router `gate`, experts
-- w1 (gate), w3 (up), w2 (down) under the checkpoint's per-expert names, top-k always renormalised — with the router
-- load-balancing loss when output_router_logits. The layers are the Llama family's (models/decoder.lua).
local core    = require "fsdp.core"
local decoder = require "fsdp.models.decoder"
local MoE     = require "fsdp.nn.moe"

local M = {
  model_type = "mixtral",
  architectures = {"MixtralForCausalLM"},
  base_prefix = "model",
  tied = decoder.tied,
  fsdp_plan = decoder.fsdp_plan,
  aliases = {num_experts = "num_local_experts"},
}

M.defaults = {
  vocab_size = 32000, hidden_size = 4096, intermediate_size = 14336, num_hidden_layers = 32,
  num_attention_heads = 32, num_key_value_heads = 8, head_dim = nil, hidden_act = "silu",
  max_position_embeddings = 4096 * 32, initializer_range = 0.02, rms_norm_eps = 1e-5, tie_word_embeddings = false,
  rope_parameters = nil, sliding_window = nil, attention_dropout = 0.0, num_local_experts = 8,
  num_experts_per_tok = 2, output_router_logits = false, router_aux_loss_coef = 0.001, router_jitter_noise = 0.0,
  bos_token_id = 1, eos_token_id = 2, pad_token_id = nil,
}
M.float_keys = {initializer_range = true, rms_norm_eps = true, attention_dropout = true, router_aux_loss_coef = true,
                router_jitter_noise = true}
M.schema = {
  vocab_size = "size", hidden_size = "size", intermediate_size = "size", num_hidden_layers = "size",
  num_attention_heads = "size", num_key_value_heads = "size?", head_dim = "size?", hidden_act = "string",
  max_position_embeddings = "size", initializer_range = "nonneg", rms_norm_eps = "eps", tie_word_embeddings = "bool",
  sliding_window = "size?", attention_dropout = "prob", num_local_experts = "size", num_experts_per_tok = "size",
  output_router_logits = "bool", router_aux_loss_coef = "nonneg", router_jitter_noise = "nonneg",
  bos_token_id = "token_id?", eos_token_id = "token_id?", pad_token_id = "token_id?", rope_theta = "positive?",
}
M.default_theta = 1000000.0

-- 4 experts, top-2, a visible aux coefficient.
M.tiny_config = {vocab_size = 101, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2,
                 num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 64,
                 num_local_experts = 4, num_experts_per_tok = 2, output_router_logits = true,
                 router_aux_loss_coef = 0.02, tie_word_embeddings = false}

M.expert_names = {gate = "w1", up = "w3", down = "w2", order = {"w1", "w2", "w3"}}

function M.normalize(cfg)
  if cfg.num_experts_per_tok > cfg.num_local_experts then
    core.raise(("config: mixtral: num_experts_per_tok %d exceeds num_local_experts %d")
               :format(cfg.num_experts_per_tok, cfg.num_local_experts))
  end
  if cfg.router_jitter_noise ~= 0 then
    core.raise(("config: mixtral: router_jitter_noise = %s is not supported (only 0)"):format(tostring(cfg.router_jitter_noise)))
  end
  return decoder.normalize_common(cfg, M.default_theta)
end

-- Fused checkpoints (transformers v5 saved with save_original_format = False) load too: the router is mlp.gate and
-- the experts mlp.experts.gate_up_proj / down_proj.
function M.fused_source(cfg, name)
  local pre = name:match("^(.*)%.block_sparse_moe%.gate%.weight$")
  if pre then return pre .. ".mlp.gate.weight", 0, {cfg.num_local_experts, cfg.hidden_size} end
  local lay, e, which = name:match("^(.*)%.block_sparse_moe%.experts%.(%d+)%.(w%d)%.weight$")
  if not lay then return nil end
  return MoE.fused_source(lay .. ".mlp.experts", tonumber(e), which, M.expert_names, cfg.num_local_experts,
                          cfg.intermediate_size, cfg.hidden_size)
end

M.build, M.classes = decoder.make{
  prefix = "Mixtral",
  class_names = {MoEExpert = "MixtralBlockSparseTop2MLP"},   -- transformers v4's name of one expert
  attention = function(cfg) return {bias = false, window = cfg.sliding_window or 0} end,
  mlp = function() return {bias = false} end,
  ffn = function(cfg, _, o)
    return "block_sparse_moe", MoE.SparseMoE.new(cfg.hidden_size, {num_experts = cfg.num_local_experts,
      top_k = cfg.num_experts_per_tok, inner = cfg.intermediate_size, renormalize = true,
      expert_names = M.expert_names, activation = cfg.hidden_act, std = cfg.initializer_range,
      device = o.device, dtype = o.dtype})
  end,
  moe = function(cfg)
    return {num_experts = cfg.num_local_experts, top_k = cfg.num_experts_per_tok, coef = cfg.router_aux_loss_coef}
  end,
}

return M
