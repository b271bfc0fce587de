-- lua/fsdp/parallel/init.lua: `require "fsdp.parallel"` — the one home of data parallelism. FSDP: plans
-- (plan.lua: plan forms and units; plan_options.lua: their options; explain.lua: each rank's shards), the engine
-- units and their module hooks (units.lua), what a sharded module can do (fsdp_module.lua); DDP (ddp.lua);
-- device meshes (mesh.lua, also fsdp.mesh). Collectives are fsdp.dist's. Everything attaches to modules through
-- nn.Module's generic hooks and Module.extend.
local M = {}

local units       = require "fsdp.parallel.units"
local plan        = require "fsdp.parallel.plan"
local explain     = require "fsdp.parallel.explain"
local fsdp_module = require "fsdp.parallel.fsdp_module"

M.apply_plan, M.fully_shard = units.apply_plan, units.fully_shard
M.resolve, M.mixed_precision = plan.resolve, plan.mixed_precision
M.explain, M.format, M.dim0_shard = explain.explain, explain.format, explain.dim0_shard
M.shards, M.group, M.unsharded_count, M.peak_unsharded = fsdp_module.shards, fsdp_module.group,
  fsdp_module.unsharded_count, fsdp_module.peak_unsharded
-- Whatever the model is (plain, DDP, sharded), its own method answers.
function M.full_state_dict(model, opts) return model:full_state_dict(opts) end
function M.set_requires_gradient_sync(model, on) return model:set_requires_gradient_sync(on) end
M.memory_stats, M.reset_peak_memory = fsdp_module.memory_stats, fsdp_module.reset_peak_memory
M.ddp = require "fsdp.parallel.ddp"
M.mesh = require("fsdp.parallel.mesh").mesh

return M
