-- lua/fsdp/models/qwen_moe.lua: what Qwen2-MoE and Qwen3-MoE share (hf-models.md §7, §9): which layers route
-- (decoder_sparse_step, mlp_only_layers), the MoE block under `mlp` — router `gate`, experts gate_proj/up_proj/
-- down_proj of moe_intermediate_size, top-k renormalised only with norm_topk_prob — and the aux-loss settings.
local core    = require "fsdp.core"
local MoE     = require "fsdp.nn.moe"

local M = {}

M.expert_names = {gate = "gate_proj", up = "up_proj", down = "down_proj", order = {"gate_proj", "up_proj", "down_proj"}}

-- Layer i (1-based) routes unless it is in mlp_only_layers (0-based indices) or off the decoder_sparse_step grid.
function M.is_moe_layer(cfg, i)
  for _, j in ipairs(cfg.mlp_only_layers or {}) do if j == i - 1 then return false end end
  return cfg.num_experts > 0 and i % cfg.decoder_sparse_step == 0
end

function M.check(cfg)
  local mt = cfg.model_type
  if cfg.num_experts_per_tok > cfg.num_experts then
    core.raise(("config: %s: num_experts_per_tok %d exceeds num_experts %d"):format(mt, cfg.num_experts_per_tok, cfg.num_experts))
  end
  local mol = cfg.mlp_only_layers
  if mol ~= nil and type(mol) ~= "table" then core.raise(("config: %s: mlp_only_layers must be a list"):format(mt)) end
  for _, j in ipairs(mol or {}) do
    if type(j) ~= "number" or j ~= math.floor(j) or j < 0 or j >= cfg.num_hidden_layers then
      core.raise(("config: %s: mlp_only_layers holds %s, not a layer index in [0, %d)"):format(mt, tostring(j), cfg.num_hidden_layers))
    end
  end
end

-- The ffn trait: an MoE block under "mlp" on routing layers, nil (the dense gated MLP) elsewhere. Qwen2-MoE has
-- the shared expert and registers its router first; Qwen3-MoE registers its experts first.
function M.ffn(shared)
  return function(cfg, i, o)
    if not M.is_moe_layer(cfg, i) then return nil end
    return "mlp", MoE.SparseMoE.new(cfg.hidden_size, {num_experts = cfg.num_experts, top_k = cfg.num_experts_per_tok,
      inner = cfg.moe_intermediate_size, renormalize = cfg.norm_topk_prob, expert_names = M.expert_names,
      shared_inner = shared and cfg.shared_expert_intermediate_size or nil, gate_last = not shared,
      activation = cfg.hidden_act,
      std = cfg.initializer_range, device = o.device, dtype = o.dtype})
  end
end

-- A per-expert name's place in a fused (transformers v5 in-memory) checkpoint: key, element offset, shape.
function M.fused_source(cfg, name)
  local pre, e, which = name:match("^(.*%.mlp%.experts)%.(%d+)%.([%w_]+)%.weight$")
  if not pre then return nil end
  return MoE.fused_source(pre, tonumber(e), which, M.expert_names, cfg.num_experts, cfg.moe_intermediate_size,
                          cfg.hidden_size)
end

function M.moe(cfg)
  return {num_experts = cfg.num_experts, top_k = cfg.num_experts_per_tok, coef = cfg.router_aux_loss_coef}
end

return M
