-- lua/fsdp/parallel/explain.lua: explain(model, plan, world_size) — the units a plan resolves to (plan.lua) with
-- every rank's dim-0 shard of every parameter and the memory that implies, without communicating or sharding;
-- it prints the same table fsdp.shards prints after sharding (shard_table.lua) and the estimate (memory.lua).
local ffi  = require "ffi"
local core = require "fsdp.core"
local plans = require "fsdp.parallel.plan"
local ST    = require "fsdp.parallel.shard_table"
local memory = require "fsdp.parallel.memory"

local C = core.C
local fail, protect, resolve = plans.fail, plans.protect, plans.resolve_tree
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

local EXPLAIN_OPTS = {mixed_precision = true, cpu_offload = true, reshard_after_forward = true, optimizer = true}

local function explain(model, plan, world_size, opts)
  if type(world_size) ~= "number" or world_size < 1 or world_size ~= math.floor(world_size) then
    fail("explain: world_size must be a positive integer, got %s", tostring(world_size))
  end
  opts = opts or {}
  if type(opts) ~= "table" then fail("explain: options must be a table, got %s", type(opts)) end
  local resolve_opts = {}
  for k, v in pairs(opts) do
    if not EXPLAIN_OPTS[k] then
      fail("explain: unknown option '%s' (valid: cpu_offload, mixed_precision, optimizer, reshard_after_forward)",
           tostring(k))
    end
    if k ~= "optimizer" then resolve_opts[k] = v end
  end
  local W = world_size
  local units, tree = resolve(model, plan, resolve_opts)
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
  -- the table fsdp.shards prints after apply_plan at W ranks, and the memory it implies
  local tbl = ST.from_plan(units, tensor_of, W, M.dim0_shard)
  tbl.memory = memory.estimate(model, tbl, tree, {optimizer = opts.optimizer})
  return setmetatable({world_size = W, units = units, numel = total, numel_per_rank = total_rank,
                       padded_numel_per_rank = total_padded, table = tbl, memory = tbl.memory}, Explanation)
end

-- explain(model, plan, world_size, {mixed_precision =, cpu_offload =, reshard_after_forward =, optimizer =})
-- -> {world_size, units, numel, numel_per_rank = {[r]}, padded_numel_per_rank, table, memory}
-- where each unit is resolve's plus numel, numel_per_rank = {[r]}, padded_numel_per_rank (the per-rank size of
-- its all-gather buffer), padded_numel, and shards = {[param] = {shape, dtype, rows, row_numel, numel,
-- rows_per_rank = ceil(d0/W), padded_rows, ranges = {[r] = {first_row (0-based), n_rows}} for r = 0..W-1,
-- numel_per_rank = {[r]}, padded_numel_per_rank}}. `table` is the shard table fsdp.shards(model) returns once the
-- plan is applied at W ranks (shard_table.lua: units that hold parameters, every rank's rows and bytes);
-- `memory` the per-rank memory it implies (memory.lua: estimate; optimizer = "adamw" by default, "sgd",
-- "sgd_momentum", "none" or {states = n}). tostring() of it (or M.format) prints both.
function M.explain(model, plan, world_size, opts)
  local ex = protect(explain, model, plan, world_size, opts)   -- not a tail call: errors point at our caller
  return ex
end

function M.format(ex)
  if getmetatable(ex) ~= Explanation then error("plan.format: expected the result of explain()", 2) end
  return ST.format(ex.table)
end

Explanation.__tostring = M.format

return M
