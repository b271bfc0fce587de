-- spec/apply_options_spec.lua: every option of apply_plan, fully_shard, fsdp.ddp, materialize and build is
-- checked before anything changes. Each bad value raises an error naming the option (exact text), the model is
-- left as it was (no unit marks, parameters unsharded and on meta, the same printed tree), and a retry with good
-- options gives exactly the model a fresh call gives (the same printed units, the same weights bit for bit).
local ffi    = require "ffi"
local fsdp   = require "fsdp"
local Tensor = require "fsdp.tensor"

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local cfg = fsdp.models.tiny_config("gpt2")
local function meta_model() return fsdp.models.build(cfg, {device = "meta"}) end

-- Nothing of a sharding is left on the model: no unit on any module, every parameter its own (unsharded) local
-- tensor and still on meta, and the printed tree is a fresh model's.
local function untouched(m, what)
  assert.is_nil(rawget(m, "_fsdp_group"), what .. ": the model has a unit group")
  for name, mod in m:named_modules() do
    assert.is_nil(rawget(mod, "_fsdp_unit"), ("%s: module '%s' belongs to a unit"):format(what, name))
  end
  for name, p in m:named_parameters() do
    assert.is_true(Tensor.local_of(p) == p, ("%s: '%s' is sharded"):format(what, name))
    assert.equal("meta", p.device, what .. ": " .. name)
  end
  assert.equal(tostring(meta_model()), tostring(m), what)
end

local function weights(m)
  local out = {}
  for name, t in pairs(m:full_state_dict()) do out[name] = ffi.string(t:contiguous():data_ptr(), t:numel() * 4) end
  return out
end

local fresh
local function fresh_applied()
  if not fresh then
    local m = fsdp.apply_plan(meta_model(), "auto", {seed = 3})
    fresh = {text = tostring(m), weights = weights(m)}
  end
  return fresh
end

local function retry_equals_fresh(m, what)
  fsdp.apply_plan(m, "auto", {seed = 3})
  local f = fresh_applied()
  assert.equal(f.text, tostring(m), what)
  local n = 0
  for name, b in pairs(f.weights) do
    assert.is_true(weights(m)[name] == b, ("%s: retried '%s' differs from a fresh apply"):format(what, name))
    n = n + 1
  end
  assert.is_true(n > 5)
end

describe("apply_plan checks every option before it shards", function()
  for _, c in ipairs {
    {{seed = "x"}, "apply_plan: seed must be an integer in [0, 2^53), got 'x'"},
    {{seed = 1.5}, "apply_plan: seed must be an integer in [0, 2^53), got 1.5"},
    {{seed = -1}, "apply_plan: seed must be an integer in [0, 2^53), got -1"},
    {{seed = 2 ^ 53}, "apply_plan: seed must be an integer in [0, 2^53), got 9.007199254741e+15"},
    {{seed = 0 / 0}, "apply_plan: seed must be an integer in [0, 2^53), got "},
    {{init = "no"}, "apply_plan: init must be a boolean, got string"},
    {{mesh = "dp"}, "apply_plan: mesh must be a mesh from fsdp.mesh, got string"},
    {{mesh = {}}, "apply_plan: mesh must be a mesh from fsdp.mesh, got table"},
    {{mixed_precision = {param_dtype = "f8"}}, "plan: options: mixed_precision.param_dtype: unknown dtype 'f8'"},
    {{mixed_precision = "bf16"}, "plan: options: mixed_precision must be a table"},
    {{cpu_offload = 1}, "plan: option cpu_offload must be a boolean, got number"},
    {{reshard_after_forward = "yes"}, "plan: option reshard_after_forward must be a boolean, got string"},
    {{sed = 3}, "apply_plan: unknown option 'sed' (valid: cpu_offload, init, mesh, mixed_precision, "
                .. "reshard_after_forward, seed)"},
  } do
    local opts, msg = unpack(c)
    local k = next(opts)
    local shown = type(opts[k]) == "table" and "a table" or tostring(opts[k])
    it(("%s = %s: %s; the model is untouched and a retry equals a fresh apply"):format(k, shown, msg), function()
      local m = meta_model()
      local err = err_of(fsdp.apply_plan, m, "auto", opts)
      assert.is_truthy(err:find(msg, 1, true), err)
      assert.is_truthy(err:find("apply_options_spec.lua", 1, true), "the error points at the caller: " .. err)
      untouched(m, k)
      retry_equals_fresh(m, k)
    end)
  end

  it("a 2-D mesh with a dim that is not data-parallel is named as apply_plan's mesh", function()
    local mesh = fsdp.mesh{{"dp_shard", 1}, {"tp", 1}}
    local m = meta_model()
    assert.matches("apply_plan: mesh: dim 'tp' is not data%-parallel", err_of(fsdp.apply_plan, m, "auto", {mesh = mesh}))
    untouched(m, "mesh")
    retry_equals_fresh(m, "mesh")
  end)
end)

describe("fully_shard, fsdp.ddp, materialize and build check their options first", function()
  for _, c in ipairs {
    {{reshard_after_forward = "no"}, "fully_shard: reshard_after_forward must be a boolean, got string"},
    {{mesh = 4}, "fully_shard: mesh must be a mesh from fsdp.mesh, got number"},
    {{mp_policy = {reduce_dtype = "i8"}}, "fully_shard: mixed_precision.reduce_dtype: unknown dtype 'i8'"},
    {{group = {}}, "fully_shard: group must be a sharded model's unit group (fsdp.parallel.group(model)), got table"},
  } do
    local opts, msg = unpack(c)
    local k = next(opts)
    it(("fully_shard %s: %s; nothing is sharded"):format(k, msg), function()
      local m = meta_model()
      local err = err_of(fsdp.fully_shard, m.transformer.h[1], opts)
      assert.is_truthy(err:find(msg, 1, true), err)
      untouched(m, k)
      retry_equals_fresh(m, k)
    end)
  end

  it("materialize{seed = 1.5} and build{seed = 'x'} fail before a parameter is allocated", function()
    local m = meta_model()
    assert.is_truthy(err_of(m.materialize, m, {seed = 1.5}):find("materialize: seed must be an integer in [0, 2^53), got 1.5", 1, true))
    untouched(m, "materialize")
    assert.is_truthy(err_of(fsdp.models.build, cfg, {seed = "x"}):find("build: seed must be an integer in [0, 2^53), got 'x'", 1, true))
    assert.is_truthy(err_of(fsdp.models.build, cfg, {device = "meta", seed = 0.5}):find("build: seed must be an integer", 1, true))
  end)

  for _, c in ipairs {
    {{bucket_cap_mb = -1}, "ddp: bucket_cap_mb must be a number >= 0, got -1"},
    {{bucket_cap_mb = "25"}, "ddp: bucket_cap_mb must be a number >= 0, got 25"},
    {{mesh = "world"}, "ddp: mesh must be a mesh from fsdp.mesh, got string"},
    {{buckets = 2}, "ddp: unknown option 'buckets' (valid: bucket_cap_mb, mesh)"},
  } do
    local opts, msg = unpack(c)
    local k = next(opts)
    it(("fsdp.ddp %s: %s; the model is not wrapped and a retry works"):format(k, msg), function()
      local m = fsdp.models.build(cfg, {seed = 3})
      local err = err_of(fsdp.ddp, m, opts)
      assert.is_truthy(err:find(msg, 1, true), err)
      assert.is_nil(rawget(m, "ddp"))
      fsdp.ddp(m)
      assert.is_table(rawget(m, "ddp"))
    end)
  end
end)
