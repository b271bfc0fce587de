-- lua/fsdp/parallel/ddp.lua: fsdp.ddp(model, opts) — plain data parallelism, as torch's DistributedDataParallel:
-- every rank holds the whole model, rank 0's weights are broadcast at wrap time, and each backward averages the
-- gradients over the group (engine/dist/ddp.c does the work, in buckets). The parity baseline for FSDP. The model
-- takes a DDP class (Module.extend) with the sync methods, and a forward pre-hook arms the reduction.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local Tensor = require "fsdp.tensor"

local C = core.C

local DDP_OPTS = {mesh = true, bucket_cap_mb = true}

local function pack(...) return {n = select("#", ...), ...} end

-- The data-parallel group (a dist.Comm) and the 1-D mesh it came from: all of the mesh's dims flattened (a 1-D
-- mesh is its own group), or the world without a mesh. Flattening is collective; the same call on every rank.
local function group_of(mesh)
  local dist = require "fsdp.dist"
  if mesh == nil then return dist.world(), nil end
  if getmetatable(mesh) ~= dist.Mesh then   -- the type lives in dist; parallel/mesh.lua builds them
    core.raise(("ddp: mesh must be a mesh from fsdp.mesh, got %s"):format(type(mesh)))
  end
  local names = mesh:names()
  if #names == 1 then return mesh:group(), mesh end
  local name = table.concat(names, "_")
  local ok, flat = pcall(function() return mesh[name] end)   -- flattened before (by an earlier ddp)
  if not ok then flat = mesh:flatten(names, name) end
  return flat:group(), flat
end

-- The methods of a DDP model (its class from Module.extend); the state is model.ddp.
local METHODS = {}

function METHODS.set_requires_gradient_sync(self, on)
  if type(on) ~= "boolean" then
    error(("set_requires_gradient_sync: expected a boolean, got %s"):format(type(on)), 2)
  end
  C.fl_ddp_set_sync(self.ddp.handle, on)
end

function METHODS.requires_gradient_sync(self) return C.fl_ddp_get_sync(self.ddp.handle) end

-- no_sync(fn, ...): runs fn with gradient sync off and restores it after, also when fn raises.
function METHODS.no_sync(self, fn, ...)
  if type(fn) ~= "function" then error(("no_sync: expected a function, got %s"):format(type(fn)), 2) end
  local h = self.ddp.handle
  local was = C.fl_ddp_get_sync(h)
  C.fl_ddp_set_sync(h, false)
  local res = pack(pcall(fn, ...))
  C.fl_ddp_set_sync(h, was)
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, res.n)
end

-- ddp(model, {mesh =, bucket_cap_mb = 25}) -> model, wrapped in place: model.ddp holds the state (and keeps the
-- C object and its group alive as long as the model), model:set_requires_gradient_sync(bool) turns the
-- gradient all-reduce on/off for accumulation micro-steps, model:no_sync(fn, ...) runs fn with it off.
-- Parameters with requires_grad = false are not replicated (as torch).
local function ddp(model, opts)
  opts = core.check_opts("ddp", opts, DDP_OPTS, 2)
  if type(model) ~= "table" or type(model.parameter_list) ~= "function" then
    error(("ddp: expected a module, got %s"):format(type(model)), 2)
  end
  if rawget(model, "ddp") ~= nil then error("ddp: this model is already wrapped by ddp", 2) end
  if rawget(model, "_fsdp_group") ~= nil then error("ddp: this model is sharded by FSDP; use one or the other", 2) end
  local cap_mb = opts.bucket_cap_mb
  if cap_mb == nil then cap_mb = 25 end
  if type(cap_mb) ~= "number" or cap_mb ~= cap_mb or cap_mb < 0 or cap_mb == math.huge then
    error(("ddp: bucket_cap_mb must be a number >= 0, got %s"):format(tostring(opts.bucket_cap_mb)), 2)
  end
  local group, group_mesh = group_of(opts.mesh)

  local names, tensors = {}, {}
  for _, e in ipairs(model:parameter_list()) do
    if e[2].requires_grad then
      names[#names + 1], tensors[#tensors + 1] = e[1], e[2]
    end
  end
  local n = #tensors
  local cparams = ffi.new("fl_tensor *[?]", math.max(n, 1))
  local cnames = ffi.new("const char *[?]", math.max(n, 1))
  for i = 1, n do
    cparams[i - 1] = tensors[i]._p
    cnames[i - 1] = names[i]   -- the Lua strings in `names` outlive the call
  end
  -- torch: int(bucket_cap_mb * 1024 * 1024)
  local p = C.fl_ddp_new(group._p, n, cparams, cnames, math.floor(cap_mb * 1024 * 1024))
  if p == nil then error(core.last_error(), 2) end   -- the engine's message starts with "ddp:"

  local state = {
    handle = ffi.gc(p, C.fl_ddp_release),
    group = group,               -- the C object borrows its fl_comm: the state keeps it (and its mesh) alive
    mesh = group_mesh,
    names = names,
    params = tensors,
    bucket_cap_mb = cap_mb,
  }
  -- Bucket layout, for inspection: {{names...}, ...} in the order the all-reduces are issued.
  function state.buckets()
    local out = {}
    local idx = ffi.new("int32_t[?]", math.max(n, 1))
    for b = 0, C.fl_ddp_num_buckets(state.handle) - 1 do
      local k = C.fl_ddp_bucket_params(state.handle, b, idx)
      local list = {}
      for j = 0, k - 1 do list[#list + 1] = names[idx[j] + 1] end
      out[#out + 1] = list
    end
    return out
  end
  -- Averages the grads now (what a reducing backward does at its end); collective over the group.
  function state.sync_grads() core.check(C.fl_ddp_sync_grads(state.handle), nil, 2) end
  rawset(model, "ddp", state)
  for _, t in ipairs(tensors) do Tensor.set_replica_group(t, group._p) end   -- the gradient norm splits its work

  -- The forward arms the reduction of the backward that follows (torch's prepare_for_backward): a backward
  -- that did not come from this model's forward never communicates, so dropping an old model is safe.
  state.hook = model:register_forward_pre_hook(function() C.fl_ddp_prepare_backward(state.handle) end)
  Module.extend(model, "DDP", METHODS)
  return model
end

return ddp
