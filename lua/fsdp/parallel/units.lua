-- lua/fsdp/parallel/units.lua: FSDP units on a module tree. A plan (parallel/plan.lua) says which modules form
-- which unit; this file makes the engine units (engine/dist/fsdp.c), initialises or copies the local shards, and
-- attaches each unit to its modules through their generic forward hooks: a pre-hook unshards (and checks that
-- shards made on meta were initialised), a post-hook puts the pre-backward node on the output. The model then
-- takes the FSDP module class (parallel/fsdp_module.lua), and model:parameters() yields the local shards.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local Module = require "fsdp.nn.module"

local C = core.C
local M = {}


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
    if Tensor.shard_info(shard).pending_init then
      core.raise(("fsdp %s: parameter '%s' was sharded on meta and is not initialised: call "
                  .. "model:materialize{seed = ...} after fully_shard, before the first forward"):format(u.name, u.params[i].name))
    end
  end
  u.uninitialized = nil
end

-- The hooks a unit puts on each of its modules: unshard before forward; after it, a view of the output whose
-- backward unshards the unit again before the unit's backward runs (and the output cast, under mixed precision).
local function unit_hooks(u)
  local function pre(_, _)
    if u.uninitialized then check_initialized(u) end
    if C.fl_fsdp_pre_forward(u.ptr) < 0 then core.raise("fsdp " .. u.name .. ": " .. core.last_error()) end
  end
  local function post(_, _, out)
    if not (Tensor.is_tensor(out) and out.requires_grad) then return nil end
    local v = Tensor.own(C.fl_fsdp_post_forward(u.ptr, out._p), "fsdp " .. u.name)
    out:free()
    if u.output_dtype and v.dtype ~= u.output_dtype then
      local c = v:to(u.output_dtype); v:free(); v = c
    end
    return v
  end
  return pre, post
end

-- Makes one unit over `params` (records {name, full, module, local_name, on_meta, deferred_init}, see
-- param_entries) on the modules `mods` (`extra`: the set of those that only use one of its tied parameters). Shards
-- of meta parameters are initialised from their init spec for this rank's rows only, or (deferred_init:
-- fully_shard, which sees local names only) left for model:materialize.
local function make_unit(group, spec, params, mods, opts, extra)
  local shard_comm, rep_comm = comms_of(opts.mesh)
  local pd, rd, od = mp_dtypes(spec.mixed_precision)
  local n = #params
  local arr = ffi.new("fl_tensor *[?]", math.max(n, 1))
  for i, e in ipairs(params) do arr[i - 1] = e.full._p end
  local up = C.fl_fsdp_unit_new(group.ptr, spec.name, shard_comm, rep_comm, n, arr, core.dtypes[pd], core.dtypes[rd],
                                spec.reshard_after_forward and true or false)
  if up == nil then core.raise(core.last_error()) end
  local u = {ptr = up, name = spec.name, params = params, shards = {}, output_dtype = od, cpu_offload = spec.cpu_offload,
             reshard_after_forward = spec.reshard_after_forward and true or false,
             mixed_precision = spec.mixed_precision, param_dtype = pd, extra = extra or {},
             modules = spec.modules, extra_modules = spec.extra_modules, is_root = spec.is_root, group = group}
  -- A printed shard reads its unit's state; held weakly, so that a shard outliving its model does not keep the
  -- model's units alive, and reads nothing once they are gone (u.group keeps the engine group alive while u is).
  local weak = setmetatable({u = u}, {__mode = "v"})
  local function state()
    local w = weak.u
    if not w then return "released" end
    return C.fl_fsdp_is_unsharded(w.ptr) and "gathered" or "sharded"
  end
  local seed = opts.seed or 0
  for i, e in ipairs(params) do
    local shard = Tensor.wrap(C.fl_fsdp_unit_shard(up, i - 1))
    local full = e.full
    local row0 = tonumber(C.fl_fsdp_unit_shard_row0(up, i - 1))
    local offset = row0 * (full:numel() / math.max(full:dim() > 0 and full:size(1) or 1, 1))
    -- what printing and inspection read (tensor_str.lua, fsdp.shards): the unit, its state, this rank's rows
    local info = {group = shard_comm, offset = offset, numel = full:numel(), unit = spec.name, state = state,
                  row0 = row0, nrows = shard:size(1),   -- a shard has dim 0 even for a 0-d parameter
                  full_rows = full:dim() > 0 and full:size(1) or 1}
    if e.on_meta and opts.init ~= false then   -- this rank's rows of the full initialisation
      if e.deferred_init then
        info.pending_init = true
        u.uninitialized = true
      else
        local init = e.module._param_init[e.local_name]
        if init[1] ~= "keep" and shard:numel() > 0 then Module.init_values(shard, init, seed, e.name, offset) end
      end
    end
    Tensor.set_shard_info(shard, info)
    Tensor.set_local(full, shard)
    u.shards[i] = shard
  end
  group.units[#group.units + 1] = u
  local pre, post = unit_hooks(u)
  for _, m in ipairs(mods) do   -- the callers checked that no module belongs to a unit yet
    rawset(m, "_fsdp_unit", u)
    m:register_forward_pre_hook(pre)
    m:register_forward_hook(post)
  end
  return u
end

function M.new_group()
  local gp = C.fl_fsdp_group_new()
  if gp == nil then core.raise(core.last_error()) end
  return {ptr = ffi.gc(gp, C.fl_fsdp_group_release), units = {}}
end

-- The model's parameters as records by full name: {name, full (the module's tensor), module, local_name,
-- on_meta, deferred_init}.
local function param_record(e, deferred)
  return {name = e[1], full = e[2], module = e[3], local_name = e[4], on_meta = e[2].device == "meta",
          deferred_init = deferred}
end

local function param_entries(model)
  local by_name = {}
  for _, e in ipairs(model:full_parameter_list()) do by_name[e[1]] = param_record(e, false) end
  return by_name
end

local function modules_by_name(model)
  local t = {}
  for name, m in model:named_modules() do t[name] = m end
  return t
end

local APPLY_OPTS = {mesh = true, seed = true, mixed_precision = true, cpu_offload = true, reshard_after_forward = true,
                    init = true}

-- The mesh option of apply_plan and fully_shard: nil (the world) or a data-parallel mesh (see comms_of), named
-- in the error. Joins the ranks (dist.init) as the sharding would; changes no module.
local function check_mesh(mesh, what)
  if mesh ~= nil and getmetatable(mesh) ~= dist().Mesh then
    core.raise(("%s: mesh must be a mesh from fsdp.mesh, got %s"):format(what, type(mesh)))
  end
  local ok, err = pcall(comms_of, mesh)
  if not ok then core.raise(("%s: mesh: %s"):format(what, tostring(err):gsub("^mesh_comms: ", ""))) end
end

local function check_boolean(v, what, key)
  if v ~= nil and type(v) ~= "boolean" then
    core.raise(("%s: %s must be a boolean, got %s"):format(what, key, type(v)))
  end
end

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
      local t = params[pn].full
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

-- apply_plan(model, plan, {mesh=, seed=, mixed_precision=, cpu_offload=, reshard_after_forward=, init=}): plan is
-- "auto", "declared", {mode="manual", modules={...}}, a function plan, ... (see fsdp.plan); mixed_precision,
-- cpu_offload and reshard_after_forward apply to every unit the plan does not configure itself. init = false
-- leaves the shards of meta parameters unfilled, for a caller that loads them (from_pretrained). Units are made bottom-up, the root last.
-- Atomic: the plan, the options, the model's modules and parameters and the ranks' agreement are all checked
-- before the first unit is made, so an error leaves the model exactly as it was and a retry works.
function M.apply_plan(model, plan, opts)
  opts = core.check_opts("apply_plan", opts, APPLY_OPTS, 2)
  if rawget(model, "_fsdp_group") then core.raise("apply_plan: the model is already sharded") end
  -- every option before any change: the policies in resolve, the rest here
  Module.check_seed(opts.seed, "apply_plan")
  check_boolean(opts.init, "apply_plan", "init")
  check_mesh(opts.mesh, "apply_plan")
  local units = require("fsdp.parallel.plan").resolve(model, plan, {mixed_precision = opts.mixed_precision,
    cpu_offload = opts.cpu_offload, reshard_after_forward = opts.reshard_after_forward})
  local params, mods = param_entries(model), modules_by_name(model)
  local work = {}
  for _, spec in ipairs(units) do
    local plist, mlist, extra = {}, {}, {}
    for _, pn in ipairs(spec.params) do
      local e = params[pn]
      if not e then core.raise(("apply_plan: unit %s names parameter '%s', which the model does not have"):format(spec.name, pn)) end
      if Tensor.local_of(e.full) ~= e.full then
        core.raise(("apply_plan: parameter '%s' is already sharded (fully_shard)"):format(pn))
      end
      plist[#plist + 1] = e
    end
    local names = {}
    for _, mn in ipairs(spec.modules) do names[#names + 1] = mn end
    -- modules the root claims that use one of this unit's tied weights: calling them unshards this unit too
    for _, mn in ipairs(spec.extra_modules or {}) do names[#names + 1] = mn end
    local first_extra = #spec.modules + 1
    for k, mn in ipairs(names) do
      local m = mods[mn]
      if not m then core.raise(("apply_plan: unit %s names module '%s', which the model does not have"):format(spec.name, mn)) end
      if rawget(m, "_fsdp_unit") then
        core.raise(("apply_plan: module '%s' already belongs to unit %s"):format(mn, m._fsdp_unit.name))
      end
      mlist[#mlist + 1] = m
      if k >= first_extra then extra[m] = true end
    end
    if #plist > 0 then work[#work + 1] = {spec, plist, mlist, extra} end
  end
  check_same_units(units, params, opts.mesh)
  local group = M.new_group()
  group.mesh = opts.mesh   -- its process groups must live as long as the units that use them
  for _, w in ipairs(work) do make_unit(group, w[1], w[2], w[3], opts, w[4]) end
  require("fsdp.parallel.fsdp_module").attach(model, group)
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
  local mp = require("fsdp.parallel.plan").mixed_precision(opts.mp_policy, "fully_shard")
  check_boolean(opts.reshard_after_forward, "fully_shard", "reshard_after_forward")
  local given = opts.group
  if given ~= nil and not (type(given) == "table" and given.ptr ~= nil and type(given.units) == "table") then
    core.raise(("fully_shard: group must be a sharded model's unit group (fsdp.parallel.group(model)), got %s")
               :format(type(given)))
  end
  for _, m in ipairs(list) do
    if rawget(m, "_fsdp_unit") then
      core.raise(("fully_shard %s: module already belongs to unit %s"):format(m.__name or "module", m._fsdp_unit.name))
    end
  end
  check_mesh(opts.mesh, "fully_shard")   -- before any group is merged
  local plist, claimed = {}, {}
  for _, m in ipairs(list) do
    for _, e in ipairs(m:full_parameter_list()) do
      local t = e[2]
      if Tensor.local_of(t) == t and not claimed[t] then
        claimed[t] = true
        plist[#plist + 1] = param_record(e, true)   -- names are local to the module: materialize initialises
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
  group = group or M.new_group()
  for _, sub in ipairs(subs) do
    local g = sub._fsdp_group
    if g ~= group then
      core.check(C.fl_fsdp_group_merge(group.ptr, g.ptr), "fully_shard", 2)
      for _, u in ipairs(g.units) do group.units[#group.units + 1] = u; u.group = group end
      g.units = {}
    end
    rawset(sub, "_fsdp_group", group)
  end
  local u = make_unit(group, spec, plist, list, opts)
  local fm = require "fsdp.parallel.fsdp_module"
  for _, m in ipairs(list) do fm.attach(m, group) end  -- the last call's module is the root
  return u
end

return M
