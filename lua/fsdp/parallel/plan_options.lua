-- lua/fsdp/parallel/plan_options.lua: the small grammar plans share (parallel/plan.lua): unit OPTIONS and the
-- mixed-precision table, their parsing and printing, and the plan errors (raised at the user's line by
-- protect). The plan forms, patterns and unit building are plan.lua's.
local core = require "fsdp.core"

local M = {}

local FLOAT_DTYPES = {f32 = true, f64 = true, bf16 = true, f16 = true}
local MP_KEYS = {param_dtype = true, reduce_dtype = true, output_dtype = true}
local OPTION_KEYS = {free_full_weight = true, keep_full_weight = true, cpu_offload = true, mixed_precision = true}
local FLAGS = {free_full_weight = true, keep_full_weight = true, cpu_offload = true}
local PLAN_KEYS = {mode = true, modules = true, mixed_precision = true, cpu_offload = true, reshard_after_forward = true}
local MODES = {auto = true, declared = true, manual = true, ["function"] = true}
local RESOLVE_OPTS = {mixed_precision = true, cpu_offload = true, reshard_after_forward = true}

local function keys(set)
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return table.concat(out, ", ")
end

-- Plan errors travel as a tagged table so the public entry points can re-raise them at the caller's line, while
-- errors raised by a user's plan function pass through untouched.
local PlanError = {}
local function fail(fmt, ...)
  error(setmetatable({msg = "plan: " .. fmt:format(...)}, PlanError), 0)
end

local function protect(fn, ...)
  local r = {pcall(fn, ...)}
  if r[1] then return unpack(r, 2, table.maxn(r)) end
  if getmetatable(r[2]) == PlanError then core.raise(r[2].msg) end
  error(r[2], 0)
end

-- ---- options ----

local function check_dtype(v, where, key)
  if not FLOAT_DTYPES[v] then
    fail("%s: mixed_precision.%s: unknown dtype '%s' (valid: %s)", where, key, tostring(v), keys(FLOAT_DTYPES))
  end
end

-- MP table -> a copy; false -> false (explicitly none); nil -> nil.
local function parse_mp(v, where)
  if v == nil or v == false then return v end
  if type(v) ~= "table" then
    fail("%s: mixed_precision must be a table {%s}, got %s", where, keys(MP_KEYS), type(v))
  end
  local out = {}
  for k, x in pairs(v) do
    if not MP_KEYS[k] then
      fail("%s: mixed_precision: unknown key '%s' (valid: %s)", where, tostring(k), keys(MP_KEYS))
    end
    check_dtype(x, where, k)
    out[k] = x
  end
  return out
end

local function mp_equal(a, b)
  if not a or not b then return (a or nil) == (b or nil) end
  for k in pairs(MP_KEYS) do if a[k] ~= b[k] then return false end end
  return true
end

local function mp_str(mp)
  if not mp then return "none" end
  local parts = {}
  for _, k in ipairs {"param_dtype", "reduce_dtype", "output_dtype"} do
    if mp[k] then parts[#parts + 1] = k .. "=" .. mp[k] end
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- OPTIONS -> {reshard = bool|nil, cpu_offload = bool|nil, mixed_precision = MP|false|nil}. `skip` names a key
-- that belongs to the entry, not to the options (group).
local function parse_options(v, where, skip)
  if v == true then return {} end
  if type(v) == "string" then v = {v} end
  if type(v) ~= "table" then
    fail("%s: options must be a table or a flag string (%s), got %s", where, keys(FLAGS), type(v))
  end
  local set = {}
  local function put(k, x)
    if set[k] ~= nil and set[k] ~= x then fail("%s: option '%s' is given twice with different values", where, k) end
    set[k] = x
  end
  for k, x in pairs(v) do
    if type(k) == "number" then
      if not FLAGS[x] then
        fail("%s: unknown option '%s' (valid: %s)", where, tostring(x), keys(OPTION_KEYS))
      end
      put(x, true)
    elseif k ~= skip then
      if not OPTION_KEYS[k] then
        fail("%s: unknown option '%s' (valid: %s)", where, tostring(k), keys(OPTION_KEYS))
      end
      if k == "mixed_precision" then
        set.mixed_precision = parse_mp(x, where)
      else
        if type(x) ~= "boolean" then fail("%s: option '%s' must be a boolean, got %s", where, k, type(x)) end
        put(k, x)
      end
    end
  end
  local free, keep = set.free_full_weight, set.keep_full_weight
  if free ~= nil and keep ~= nil and free == keep then
    fail("%s: contradictory options free_full_weight = %s and keep_full_weight = %s", where, tostring(free),
         tostring(keep))
  end
  local reshard
  if free ~= nil then reshard = free elseif keep ~= nil then reshard = not keep end
  return {reshard = reshard, cpu_offload = set.cpu_offload, mixed_precision = set.mixed_precision}
end

M.keys, M.fail, M.protect = keys, fail, protect
M.parse_mp, M.mp_equal, M.mp_str, M.parse_options = parse_mp, mp_equal, mp_str, parse_options
M.FLAGS, M.OPTION_KEYS, M.PLAN_KEYS, M.MODES, M.RESOLVE_OPTS = FLAGS, OPTION_KEYS, PLAN_KEYS, MODES, RESOLVE_OPTS

return M
