-- lua/fsdp/parallel/fsdp_module.lua: what a sharded module can do (FSDP2's FSDPModule): the methods its FSDP
-- class adds (Module.extend) — gradient sync for accumulation, gathering a full state dict, is_sharded, the unit
-- marks of the printed module tree — and the inspection of a sharded model's units (shards: shard_table.lua;
-- unsharded counts; memory_stats: memory.lua).
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local Module = require "fsdp.nn.module"

local C = core.C
local M = {}

local function group_of(model, what)
  local g = rawget(model, "_fsdp_group")
  if not g then core.raise(what .. ": the model is not sharded") end
  return g
end

-- Gradient sync for accumulation micro-steps (FSDP2's set_requires_gradient_sync): off keeps the unsharded
-- gradients across backwards; the next backward with it on reduce-scatters their sum.
local function set_requires_gradient_sync(model, on)
  if type(on) ~= "boolean" then
    core.raise(("set_requires_gradient_sync: expected a boolean, got %s"):format(type(on)))
  end
  for _, u in ipairs(group_of(model, "set_requires_gradient_sync").units) do C.fl_fsdp_set_sync(u.ptr, on) end
end

-- full_state_dict(model, {rank0_only = false}) -> {name = full f32 tensor}: gathers every parameter's f32 shards
-- (the master weights, also under mixed precision), unit by unit; every rank must call it. HF names.
local FSD_OPTS = {rank0_only = true}
local function full_state_dict(model, opts)
  opts = core.check_opts("full_state_dict", opts, FSD_OPTS, 2)
  local g = group_of(model, "full_state_dict")
  local out = {}
  local keep = not opts.rank0_only or C.fl_comm_rank(C.fl_comm_world()) == 0
  local name_of = {}   -- units made by fully_shard on a submodule know only local names
  for _, e in ipairs(model:full_parameter_list()) do name_of[e[2]] = e[1] end
  for _, u in ipairs(g.units) do
    for i, e in ipairs(u.params) do
      -- the f32 shards themselves (master weights), not the gathered param_dtype copies
      local full = Tensor.empty(e.full:shape(), {dtype = "f32"})
      core.check(C.fl_fsdp_gather_param(u.ptr, i - 1, full._p), "full_state_dict " .. u.name, 2)
      if keep then out[name_of[e.full] or e.name] = full else full:free() end
    end
  end
  return out
end

-- How the module tree marks units when it prints (nn.Module's module_notes): a module a unit hooks gets
-- "FSDP unit NAME [policy] state"; one that only uses a unit's tied weight, "uses FSDP unit NAME".
local function module_notes(model)
  local ST = require "fsdp.parallel.shard_table"
  group_of(model, "module_notes")
  return function(m)
    local u = rawget(m, "_fsdp_unit")
    if not u then return nil end
    if u.extra and u.extra[m] then return ("uses FSDP unit %s (tied weight)"):format(u.name) end
    return ("FSDP unit %s [%s] %s"):format(u.name, ST.policy_str(u), C.fl_fsdp_is_unsharded(u.ptr) and "gathered" or "sharded")
  end
end

local METHODS = {
  module_notes = module_notes,
  set_requires_gradient_sync = set_requires_gradient_sync,
  full_state_dict = full_state_dict,
  is_sharded = function() return true end,
}

-- Makes `module` a sharded module whose units live in `group` (the group keeps them alive).
function M.attach(module, group)
  rawset(module, "_fsdp_group", group)
  Module.extend(module, "FSDP", METHODS)
end

M.set_requires_gradient_sync, M.full_state_dict = set_requires_gradient_sync, full_state_dict

-- shards(model) -> the shard table (shard_table.lua) of a sharded model now: per unit its policy and state
-- (sharded or gathered), per parameter its global shape, dtype and every rank's rows and bytes (from the shard
-- geometry; nothing is communicated). tostring() prints it; shards(model)[i] is unit i.
function M.shards(model)
  local ST = require "fsdp.parallel.shard_table"
  return ST.from_group(model, group_of(model, "shards"), require("fsdp.parallel.explain").dim0_shard)
end

function M.group(model) return rawget(model, "_fsdp_group") end

-- Units of the model holding full weights right now, and the most reshard-after-forward units held at once.
function M.unsharded_count(model, freeing_only)
  return C.fl_fsdp_group_unsharded_count(group_of(model, "unsharded_count").ptr, freeing_only and true or false)
end

function M.peak_unsharded(model, reset)
  return C.fl_fsdp_group_peak_unsharded(group_of(model, "peak_unsharded").ptr, reset and true or false)
end

local memory = require "fsdp.parallel.memory"
M.memory_stats, M.reset_peak_memory = memory.memory_stats, memory.reset_peak_memory

return M
