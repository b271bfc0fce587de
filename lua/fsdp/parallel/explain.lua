-- lua/fsdp/parallel/explain.lua: explain(model, plan, world_size) — the units a plan resolves to (plan.lua) with
-- every rank's dim-0 shard of every parameter, without communicating; format() is the table the REPL prints.
local ffi  = require "ffi"
local core = require "fsdp.core"
local plans = require "fsdp.parallel.plan"

local C = core.C
local fail, protect, resolve, mp_str = plans.fail, plans.protect, plans.resolve_tree, plans.mp_str
local M = {}

local Explanation = {}
Explanation.__index = Explanation

-- Dim-0 sharding of a shape (a Lua list of sizes) over W ranks, from the engine's one shard geometry
-- (fl_shard_rows): ceil(d0/W) rows per rank, rank r holds rows [r*rows, min((r+1)*rows, d0)); the last ranks may
-- hold fewer rows or none (the collectives pad them with zeros). A 0-d tensor counts as one row.
local row0_buf, nrows_buf = ffi.new("int64_t[1]"), ffi.new("int64_t[1]")
function M.dim0_shard(shape, W)
  local d0 = shape[1] or 1
  local row = 1
  for i = 2, #shape do row = row * shape[i] end
  local rpr
  local ranges, per_rank = {}, {}
  for r = 0, W - 1 do
    rpr = tonumber(core.check(C.fl_shard_rows(d0, W, r, row0_buf, nrows_buf), "dim0_shard", 2))
    local n = tonumber(nrows_buf[0])
    ranges[r] = {tonumber(row0_buf[0]), n}
    per_rank[r] = n * row
  end
  return {shape = shape, rows = d0, row_numel = row, numel = d0 * row, rows_per_rank = rpr, padded_rows = rpr * W,
          ranges = ranges, numel_per_rank = per_rank, padded_numel_per_rank = rpr * row}
end

local function shard_of(t, W)
  local s = M.dim0_shard(t:shape(), W)
  s.dtype = t.dtype
  return s
end

local function explain(model, plan, world_size, opts)
  if type(world_size) ~= "number" or world_size < 1 or world_size ~= math.floor(world_size) then
    fail("explain: world_size must be a positive integer, got %s", tostring(world_size))
  end
  local W = world_size
  local units, tree = resolve(model, plan, opts)
  local tensor_of = {}
  for _, p in ipairs(tree.params) do tensor_of[p.name] = p.tensor end
  local total, total_rank, total_padded = 0, {}, 0
  for r = 0, W - 1 do total_rank[r] = 0 end
  for _, u in ipairs(units) do
    u.shards, u.numel, u.numel_per_rank, u.padded_numel_per_rank = {}, 0, {}, 0
    for r = 0, W - 1 do u.numel_per_rank[r] = 0 end
    for _, pn in ipairs(u.params) do
      local s = shard_of(tensor_of[pn], W)
      u.shards[pn] = s
      u.numel = u.numel + s.numel
      for r = 0, W - 1 do u.numel_per_rank[r] = u.numel_per_rank[r] + s.numel_per_rank[r] end
      u.padded_numel_per_rank = u.padded_numel_per_rank + s.padded_numel_per_rank
    end
    u.padded_numel = u.padded_numel_per_rank * W
    total = total + u.numel
    for r = 0, W - 1 do total_rank[r] = total_rank[r] + u.numel_per_rank[r] end
    total_padded = total_padded + u.padded_numel_per_rank
  end
  return setmetatable({world_size = W, units = units, numel = total, numel_per_rank = total_rank,
                       padded_numel_per_rank = total_padded}, Explanation)
end

-- explain(model, plan, world_size, opts) -> {world_size, units, numel, numel_per_rank = {[r]}, padded_numel_per_rank}
-- where each unit is resolve's plus numel, numel_per_rank = {[r]}, padded_numel_per_rank (the per-rank size of
-- its all-gather buffer), padded_numel, and shards = {[param] = {shape, dtype, rows, row_numel, numel,
-- rows_per_rank = ceil(d0/W), padded_rows, ranges = {[r] = {first_row (0-based), n_rows}} for r = 0..W-1,
-- numel_per_rank = {[r]}, padded_numel_per_rank}}. tostring() of it (or M.format) is the table the REPL prints.
function M.explain(model, plan, world_size, opts)
  local ex = protect(explain, model, plan, world_size, opts)   -- not a tail call: errors point at our caller
  return ex
end

local function policy_str(u)
  local parts = {u.reshard_after_forward and "free_full_weight" or "keep_full_weight"}
  if u.cpu_offload then parts[#parts + 1] = "cpu_offload" end
  if u.mixed_precision then parts[#parts + 1] = "mp " .. mp_str(u.mixed_precision) end
  return table.concat(parts, ", ")
end

-- A readable table: one block per unit (policy, modules, per-rank element counts) and one line per parameter
-- with its shape and each rank's rows as rank:first_row+n_rows (first_row 0-based).
function M.format(ex)
  if getmetatable(ex) ~= Explanation then error("plan.format: expected the result of explain()", 2) end
  local W = ex.world_size
  local lines = {}
  local function add(fmt, ...) lines[#lines + 1] = fmt:format(...) end
  local function per_rank(t)
    local parts = {}
    for r = 0, W - 1 do parts[#parts + 1] = tostring(t[r]) end
    return table.concat(parts, " / ")
  end
  add("FSDP plan: %d units over %d rank%s, %d parameters (elements); per rank %s (padded %d)", #ex.units, W,
      W == 1 and "" or "s", ex.numel, per_rank(ex.numel_per_rank), ex.padded_numel_per_rank)
  for i, u in ipairs(ex.units) do
    add("")
    add("unit %d  %s%s  [%s]", i, u.is_root and "root" or u.name, u.is_root and " (rest of the model)" or "",
        policy_str(u))
    if not u.is_root then add("  modules: %s", table.concat(u.modules, ", ")) end
    if #u.extra_modules > 0 then add("  also used by: %s", table.concat(u.extra_modules, ", ")) end
    add("  %d params, %d elements; per rank %s (padded %d)", #u.params, u.numel, per_rank(u.numel_per_rank),
        u.padded_numel_per_rank)
    local width, swidth = 0, 0
    for _, pn in ipairs(u.params) do
      width = math.max(width, #pn)
      swidth = math.max(swidth, #table.concat(u.shards[pn].shape, ", ") + 2)
    end
    for _, pn in ipairs(u.params) do
      local s = u.shards[pn]
      local rs = {}
      for r = 0, W - 1 do rs[#rs + 1] = ("%d:%d+%d"):format(r, s.ranges[r][1], s.ranges[r][2]) end
      local tied = u.tied[pn] and ("  (tied: " .. table.concat(u.tied[pn].names, " = ") .. ")") or ""
      add("    %-" .. width .. "s  %-4s %-" .. swidth .. "s  %d rows/rank  %s%s", pn, s.dtype,
          "[" .. table.concat(s.shape, ", ") .. "]", s.rows_per_rank, table.concat(rs, " "), tied)
    end
  end
  return table.concat(lines, "\n")
end

Explanation.__tostring = M.format

return M
