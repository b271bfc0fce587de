-- lua/fsdp/fsdp/init.lua: applying FSDP to a module tree. A plan (fsdp.plan) says which modules form which
-- unit; this file makes the engine units (engine/fsdp.c), initialises or copies the local shards, and hooks
-- the units' modules so that calling them unshards first and registers the pre-backward node on their outputs.
-- After it, model:parameters() yields the local shards (what the optimizer steps).
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local Module = require "fsdp.nn.module"

local C = core.C
local M = {}

-- Engine units of a model's modules, and the group each model's units share (keeps them alive).
local unit_of_module = setmetatable({}, {__mode = "k"})
-- Local shard -> the process group it is sharded over (gradient-norm clipping sums over it).

local function dist() return require "fsdp.dist" end

-- Shard and replicate process groups from opts.mesh (fsdp.dist.mesh_comms): a 1-D mesh shards over its only
-- dim; a mesh with dp_shard and dp_replicate shards over dp_shard and all-reduces over dp_replicate (HSDP).
local function comms_of(mesh)
  local d = dist()
  d.init()
  return d.mesh_comms(mesh)
end

-- A resolved mixed_precision table (checked by fsdp.plan) -> param, reduce and output dtypes.
local function mp_dtypes(mp)
  if not mp then return "f32", "f32", nil end
  return mp.param_dtype or "f32", mp.reduce_dtype or "f32", mp.output_dtype
end

-- fully_shard on meta leaves the shards for model:materialize to fill; a forward before that would train from
-- zeros, so the unit's first forward checks (once) that every such shard was initialised.
local function check_initialized(u)
  for i, shard in ipairs(u.shards) do
    if Module.shard_init_offset[shard] ~= nil then
      core.raise(("fsdp %s: parameter '%s' was sharded on meta and is not initialised: call "
                  .. "model:materialize{seed = ...} after fully_shard, before the first forward"):format(u.name, u.params[i][1]))
    end
  end
  u.uninitialized = nil
end

-- Runs the module under its unit: unshard before, pre-backward node on the output after.
local function call_sharded(self, u, x, ...)
  if u.uninitialized then check_initialized(u) end
  core.check(C.fl_fsdp_pre_forward(u.ptr), "fsdp " .. u.name, 3)
  local out = u.forward_call(self, x, ...)
  if Tensor.is_tensor(out) and out.requires_grad then
    local v = Tensor.own(C.fl_fsdp_post_forward(u.ptr, out._p), "fsdp " .. u.name)
    out:free()
    if u.output_dtype and v.dtype ~= u.output_dtype then
      local c = v:to(u.output_dtype); v:free(); v = c
    end
    return v
  end
  return out
end

Module.fsdp_call = function(self, x, ...)
  local u = rawget(self, "_fsdp_unit")
  return call_sharded(self, u, x, ...)
end

-- Makes one unit over `params` (a list of {name, tensor, module, local_name} from parameter_list) on the
-- modules `mods`. Shards of meta parameters are initialised from their init spec for this rank's rows only.
local function make_unit(group, spec, params, mods, opts)
  local shard_comm, rep_comm = comms_of(opts.mesh)
  local pd, rd, od = mp_dtypes(spec.mixed_precision)
  local n = #params
  local arr = ffi.new("fl_tensor *[?]", math.max(n, 1))
  for i, e in ipairs(params) do arr[i - 1] = e[2]._p end
  local up = C.fl_fsdp_unit_new(group.ptr, spec.name, shard_comm, rep_comm, n, arr, core.dtypes[pd], core.dtypes[rd],
                                spec.reshard_after_forward and true or false)
  if up == nil then error(core.last_error(), 3) end
  local u = {ptr = up, name = spec.name, params = params, shards = {}, output_dtype = od, cpu_offload = spec.cpu_offload,
             forward_call = Module.plain_call}
  local seed = opts.seed or 0
  for i, e in ipairs(params) do
    local shard = Tensor.wrap(C.fl_fsdp_unit_shard(up, i - 1))
    local full = e[2]
    local row0 = tonumber(C.fl_fsdp_unit_shard_row0(up, i - 1))
    local offset = row0 * (full:numel() / math.max(full:dim() > 0 and full:size(1) or 1, 1))
    if e[5] then   -- was on meta: this rank's rows of the full initialisation
      if e[6] then
        -- fully_shard on a submodule does not know the full dotted names: model:materialize{seed=} initialises
        Module.shard_init_offset[shard] = offset
        u.uninitialized = true
      else
        local init = e[3]._param_init[e[4]]
        if init[1] ~= "keep" and shard:numel() > 0 then Module.init_values(shard, init, seed, e[1], offset) end
      end
    end
    Module.shard_of[full] = shard
    Tensor.set_shard_info(shard, {group = shard_comm, offset = offset, numel = full:numel()})
    u.shards[i] = shard
  end
  group.units[#group.units + 1] = u
  for _, m in ipairs(mods) do   -- the callers checked that no module belongs to a unit yet
    rawset(m, "_fsdp_unit", u)
    unit_of_module[m] = u
  end
  return u
end

local function new_group()
  local gp = C.fl_fsdp_group_new()
  if gp == nil then error(core.last_error(), 3) end
  return {ptr = ffi.gc(gp, C.fl_fsdp_group_release), units = {}}
end

local function param_entries(model)
  local by_name = {}
  for _, e in ipairs(model:full_parameter_list()) do
    e[5] = e[2].device == "meta"
    by_name[e[1]] = e
  end
  return by_name
end

local function modules_by_name(model)
  local t = {}
  for name, m in model:named_modules() do t[name] = m end
  return t
end

local APPLY_OPTS = {mesh = true, seed = true, mixed_precision = true, cpu_offload = true, reshard_after_forward = true}

-- Every rank must shard the same units the same way, or the units' collectives would pair different tensors:
-- all-gathers (count, elements, a hash of names and shapes) over the shard group and names the first rank
-- that differs, before anything is sharded.
local function check_same_units(units, params, mesh)
  local shard_comm = comms_of(mesh)
  if C.fl_comm_size(shard_comm) == 1 then return end
  local h, numel = 5381, 0
  local function mix(str) for i = 1, #str do h = (h * 33 + str:byte(i)) % 2147483647 end end
  for _, spec in ipairs(units) do
    mix(spec.name)
    for _, pn in ipairs(spec.params) do
      local t = params[pn][2]
      mix(pn .. table.concat(t:shape(), "x"))
      numel = numel + t:numel()
    end
  end
  local mine = Tensor.new({#units, numel, h}, {dtype = "i64"})
  local n = C.fl_comm_size(shard_comm)
  local all = Tensor.zeros({n * 3}, {dtype = "i64"})
  core.check(C.fl_all_gather(shard_comm, all._p, mine._p), "apply_plan", 3)
  local v = all:tolist()
  for r = 1, n - 1 do
    if v[3 * r + 1] ~= v[1] or v[3 * r + 2] ~= v[2] or v[3 * r + 3] ~= v[3] then
      core.raise(("apply_plan: rank %d resolved other units than rank 0 (%d units, %d elements vs %d units, %d "
                  .. "elements): every rank must apply the same plan to the same model"):format(
                  C.fl_comm_global_rank(shard_comm, r), v[3 * r + 1], v[3 * r + 2], v[1], v[2]))
    end
  end
end

-- apply_plan(model, plan, {mesh=, seed=, mixed_precision=, cpu_offload=, reshard_after_forward=}): plan is
-- "auto", "declared", {mode="manual", modules={...}}, a function plan, ... (see fsdp.plan); the last three
-- options apply to every unit the plan does not configure itself. Units are made bottom-up, the root last.
-- Atomic: the plan, the options, the model's modules and parameters and the ranks' agreement are all checked
-- before the first unit is made, so an error leaves the model exactly as it was and a retry works.
function M.apply_plan(model, plan, opts)
  opts = core.check_opts("apply_plan", opts, APPLY_OPTS, 2)
  if rawget(model, "_fsdp_group") then core.raise("apply_plan: the model is already sharded") end
  local units = require("fsdp.plan").resolve(model, plan, {mixed_precision = opts.mixed_precision,
    cpu_offload = opts.cpu_offload, reshard_after_forward = opts.reshard_after_forward})
  local params, mods = param_entries(model), modules_by_name(model)
  local work = {}
  for _, spec in ipairs(units) do
    local plist, mlist = {}, {}
    for _, pn in ipairs(spec.params) do
      local e = params[pn]
      if not e then core.raise(("apply_plan: unit %s names parameter '%s', which the model does not have"):format(spec.name, pn)) end
      if Module.shard_of[e[2]] then core.raise(("apply_plan: parameter '%s' is already sharded (fully_shard)"):format(pn)) end
      plist[#plist + 1] = e
    end
    local names = {}
    for _, mn in ipairs(spec.modules) do names[#names + 1] = mn end
    -- modules the root claims that use one of this unit's tied weights: calling them unshards this unit too
    for _, mn in ipairs(spec.extra_modules or {}) do names[#names + 1] = mn end
    for _, mn in ipairs(names) do
      local m = mods[mn]
      if not m then core.raise(("apply_plan: unit %s names module '%s', which the model does not have"):format(spec.name, mn)) end
      if rawget(m, "_fsdp_unit") then
        core.raise(("apply_plan: module '%s' already belongs to unit %s"):format(mn, m._fsdp_unit.name))
      end
      mlist[#mlist + 1] = m
    end
    if #plist > 0 then work[#work + 1] = {spec, plist, mlist} end
  end
  check_same_units(units, params, opts.mesh)
  local group = new_group()
  group.mesh = opts.mesh   -- its process groups must live as long as the units that use them
  for _, w in ipairs(work) do make_unit(group, w[1], w[2], w[3], opts) end
  rawset(model, "_fsdp_group", group)
  return model
end

local FULLY_SHARD = {mesh = true, reshard_after_forward = true, mp_policy = true, group = true}

-- fully_shard(module_or_list, {mesh=, reshard_after_forward=true, mp_policy={param_dtype=, reduce_dtype=,
-- output_dtype=}}): one unit over every parameter of the module(s) that no earlier fully_shard claimed —
-- call it on the blocks first, then on the root, as with PyTorch FSDP2. Units of one module tree share a group
-- (found through the already sharded submodules). Parameters still on meta are sharded uninitialised: call
-- model:materialize{seed = ...} afterwards, which fills each rank's rows as the full initialisation would.
function M.fully_shard(target, opts)
  opts = core.check_opts("fully_shard", opts, FULLY_SHARD, 2)
  local list = (getmetatable(target) ~= nil and rawget(target, "_params")) and {target} or target
  if type(list) ~= "table" or #list == 0 then core.raise("fully_shard: expected a module or a list of modules") end
  local mp = require("fsdp.plan").mixed_precision(opts.mp_policy, "fully_shard")
  for _, m in ipairs(list) do
    if rawget(m, "_fsdp_unit") then
      core.raise(("fully_shard %s: module already belongs to unit %s"):format(m.__name or "module", m._fsdp_unit.name))
    end
  end
  comms_of(opts.mesh)   -- a bad mesh fails here, before any group is merged
  local plist, claimed = {}, {}
  for _, m in ipairs(list) do
    for _, e in ipairs(m:full_parameter_list()) do
      local t = e[2]
      if not Module.shard_of[t] and not claimed[t] then
        claimed[t] = true
        e[5] = t.device == "meta"
        e[6] = true   -- names are local to the module: defer the initialisation to materialize
        plist[#plist + 1] = e
      end
    end
  end
  local spec = {name = list[1].__name or "module", reshard_after_forward = opts.reshard_after_forward ~= false,
                mixed_precision = mp}
  if #plist == 0 then core.raise("fully_shard: the module(s) have no parameters left to shard") end
  -- One group per module tree: the groups of already sharded submodules (blocks first, then the root) are
  -- merged into one, so the root's forward order and final pass cover every unit below it.
  local group, subs = opts.group, {}
  for _, m in ipairs(list) do
    for _, sub in m:named_modules() do
      local g = rawget(sub, "_fsdp_group")
      if g then subs[#subs + 1] = sub; group = group or g end
    end
  end
  group = group or new_group()
  for _, sub in ipairs(subs) do
    local g = sub._fsdp_group
    if g ~= group then
      core.check(C.fl_fsdp_group_merge(group.ptr, g.ptr), "fully_shard", 2)
      for _, u in ipairs(g.units) do group.units[#group.units + 1] = u end
      g.units = {}
    end
    rawset(sub, "_fsdp_group", group)
  end
  local u = make_unit(group, spec, plist, list, opts)
  for _, m in ipairs(list) do rawset(m, "_fsdp_group", group) end  -- the last call's module is the root
  return u
end

-- Gradient sync for accumulation micro-steps (FSDP2's set_requires_gradient_sync).
function M.set_requires_gradient_sync(model, on)
  local g = rawget(model, "_fsdp_group")
  if not g then error("set_requires_gradient_sync: the model is not sharded", 2) end
  for _, u in ipairs(g.units) do C.fl_fsdp_set_sync(u.ptr, on and true or false) end
end

-- The units of a sharded model with this rank's rows of each parameter.
function M.shards(model)
  local g = rawget(model, "_fsdp_group")
  if not g then error("shards: the model is not sharded", 2) end
  local out = {}
  for i, u in ipairs(g.units) do
    local ps = {}
    for j, e in ipairs(u.params) do
      local row0 = tonumber(C.fl_fsdp_unit_shard_row0(u.ptr, j - 1))
      ps[j] = {name = e[1], shape = e[2]:shape(), first_row = row0, rows = u.shards[j]:size(1)}
    end
    out[i] = {name = u.name, params = ps, unsharded = C.fl_fsdp_is_unsharded(u.ptr)}
  end
  return out
end

function M.group(model) return rawget(model, "_fsdp_group") end

-- Units of the model holding full weights right now, and the most reshard-after-forward units held at once.
function M.unsharded_count(model, freeing_only)
  return C.fl_fsdp_group_unsharded_count(M.group(model).ptr, freeing_only and true or false)
end

function M.peak_unsharded(model, reset)
  return C.fl_fsdp_group_peak_unsharded(M.group(model).ptr, reset and true or false)
end

-- Current and peak bytes per category on this rank.
function M.memory_stats()
  local out = {}
  for name, id in pairs(core.mem_categories) do
    out[name] = {current = tonumber(C.fl_mem_current(id)), peak = tonumber(C.fl_mem_peak(id))}
  end
  out.total = {current = tonumber(C.fl_mem_total_current()), peak = tonumber(C.fl_mem_total_peak())}
  return out
end

function M.reset_peak_memory() C.fl_mem_reset_peak() end

-- full_state_dict(model, {rank0_only = false}) -> {name = full f32 tensor}: gathers every parameter's f32 shards
-- (the master weights, also under mixed precision); every rank must call it. Names are the HF names.
local FSD_OPTS = {rank0_only = true}
function M.full_state_dict(model, opts)
  opts = core.check_opts("full_state_dict", opts, FSD_OPTS, 2)
  local g = rawget(model, "_fsdp_group")
  local out = {}
  local keep = not opts.rank0_only or dist().rank() == 0
  if not g then
    for _, e in ipairs(model:parameter_list()) do if keep then out[e[1]] = e[2]:detach():contiguous() end end
    return out
  end
  local name_of = {}   -- units made by fully_shard on a submodule know only local names
  for _, e in ipairs(model:full_parameter_list()) do name_of[e[2]] = e[1] end
  for _, u in ipairs(g.units) do
    for i, e in ipairs(u.params) do
      -- the f32 shards themselves (master weights), not the gathered param_dtype copies
      local full = Tensor.empty(e[2]:shape(), {dtype = "f32"})
      core.check(C.fl_fsdp_gather_param(u.ptr, i - 1, full._p), "full_state_dict " .. u.name, 2)
      if keep then out[name_of[e[2]] or e[1]] = full else full:free() end
    end
  end
  return out
end

return M
