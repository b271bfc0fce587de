-- lua/fsdp/parallel/shard_table.lua: the one shard table that fsdp.explain (a plan at any world size, nothing
-- sharded) and fsdp.shards (a sharded model, now) both return and print: per unit its policy and state, per
-- parameter its global shape, dtype and every rank's dim-0 row range and bytes. The other ranks' ranges come from the
-- shard geometry (explain.dim0_shard over fl_shard_rows), never from communication. The memory this implies is
-- memory.lua's; the plans are plan.lua's.
local core = require "fsdp.core"

local C = core.C
local M = {}

local ShardTable = {}
ShardTable.__index = ShardTable
M.ShardTable = ShardTable

-- FSDP shards are f32 whatever the model's dtype (engine/dist/fsdp.c): the master weights the optimizer steps.
M.SHARD_DTYPE = "f32"
local function dtype_size(dt) return tonumber(C.fl_dtype_size(core.dtype_id(dt, "shard table"))) end
M.dtype_size = dtype_size

-- 1536 -> "1.50 KiB"; below 1 KiB the bytes themselves.
function M.bytes_str(n)
  if n < 1024 then return ("%d B"):format(n) end
  local units = {"KiB", "MiB", "GiB", "TiB"}
  local v, i = n / 1024, 1
  while v >= 1024 and i < #units do v, i = v / 1024, i + 1 end
  return ("%.2f %s"):format(v, units[i])
end

local function mp_str(mp)
  local parts = {}
  for _, k in ipairs {"param_dtype", "reduce_dtype", "output_dtype"} do
    if mp[k] then parts[#parts + 1] = k .. "=" .. mp[k] end
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- "free_full_weight, cpu_offload, mp {param_dtype=bf16, ...}" of a unit ({reshard_after_forward, cpu_offload,
-- mixed_precision}: a resolved plan unit or an engine unit's record).
function M.policy_str(u)
  local parts = {u.reshard_after_forward and "free_full_weight" or "keep_full_weight"}
  if u.cpu_offload then parts[#parts + 1] = "cpu_offload" end
  if u.mixed_precision then parts[#parts + 1] = "mp " .. mp_str(u.mixed_precision) end
  return table.concat(parts, ", ")
end

-- A parameter's row of the table: {name, shape, dtype (the shard's), dim0 (rows; 1 for a 0-d tensor), row_numel,
-- rows_per_rank, ranges = {[r] = {first_row, n_rows}}, bytes = {[r] = shard bytes}, numel} for r = 0..W-1.
function M.param_row(name, shape, W, dim0_shard)
  local s = dim0_shard(shape, W)
  local es = dtype_size(M.SHARD_DTYPE)
  local bytes = {}
  for r = 0, W - 1 do bytes[r] = s.numel_per_rank[r] * es end
  local sh = {}
  for i, d in ipairs(shape) do sh[i] = d end
  return {name = name, shape = sh, dtype = M.SHARD_DTYPE, dim0 = s.rows, row_numel = s.row_numel,
          rows_per_rank = s.rows_per_rank, ranges = s.ranges, bytes = bytes, numel = s.numel}
end

-- new{world_size =, rank = (nil: explain), what = "explain" | "shards", units = {...}}: each unit {name, policy
-- fields (reshard_after_forward, cpu_offload, mixed_precision), param_dtype (the gathered weights' dtype), state
-- ("sharded" | "gathered"), modules, extra_modules, params = {rows from param_row}}; fills each unit's bytes,
-- numel and padded_numel_per_rank (its all-gather chunk) and the totals. The units are also the table's array
-- part: shards(model)[1].name.
function M.new(t)
  local W = t.world_size
  t.bytes, t.numel = {}, 0
  for r = 0, W - 1 do t.bytes[r] = 0 end
  for i, u in ipairs(t.units) do
    u.bytes, u.numel, u.padded_numel_per_rank = {}, 0, 0
    for r = 0, W - 1 do u.bytes[r] = 0 end
    for _, p in ipairs(u.params) do
      u.numel = u.numel + p.numel
      u.padded_numel_per_rank = u.padded_numel_per_rank + p.rows_per_rank * p.row_numel
      for r = 0, W - 1 do u.bytes[r] = u.bytes[r] + p.bytes[r] end
    end
    t.numel = t.numel + u.numel
    for r = 0, W - 1 do t.bytes[r] = t.bytes[r] + u.bytes[r] end
    t[i] = u
  end
  return setmetatable(t, ShardTable)
end

local function range_str(rg)
  if rg[2] == 0 then return "-" end
  return ("[%d, %d)"):format(rg[1], rg[1] + rg[2])
end

-- Columns padded to their widest cell; the last column is not padded.
local function columns(rows, right)
  local w = {}
  for _, row in ipairs(rows) do
    for c, cell in ipairs(row) do w[c] = math.max(w[c] or 0, #cell) end
  end
  local out = {}
  for i, row in ipairs(rows) do
    local cells = {}
    for c, cell in ipairs(row) do
      local pad = (" "):rep(w[c] - #cell)
      if c == #row and not right[c] then cells[c] = cell
      else cells[c] = right[c] and (pad .. cell) or (cell .. pad) end
    end
    out[i] = table.concat(cells, "  ")
  end
  return out
end

-- The printed table: a header with the totals, then per unit its policy and state, its modules, and one line
-- per parameter with every rank's rows [first, end) and bytes.
function M.format(t)
  if getmetatable(t) ~= ShardTable then error("shard table: expected the result of fsdp.shards or fsdp.explain", 2) end
  local W = t.world_size
  local bs = M.bytes_str
  local lines = {}
  local per = {}
  for r = 0, W - 1 do per[#per + 1] = bs(t.bytes[r]) end
  lines[1] = ("FSDP %s: %d unit%s over %d rank%s, %s parameters; %s shards per rank: %s"):format(
    t.what == "explain" and "plan" or "shards", #t.units, #t.units == 1 and "" or "s", W, W == 1 and "" or "s",
    require("fsdp.nn.module").with_commas(t.numel), M.SHARD_DTYPE, table.concat(per, " / "))
  if t.rank then lines[1] = lines[1] .. (" (this is rank %d)"):format(t.rank) end
  for i, u in ipairs(t.units) do
    lines[#lines + 1] = ""
    -- explain's units are all sharded (as apply_plan leaves them); a sharded model's say what they are now
    lines[#lines + 1] = ("unit %d  %s  [%s]%s"):format(i, u.is_root and "root (rest of the model)" or u.name,
                                                     M.policy_str(u), t.what == "shards" and ("  " .. u.state) or "")
    if u.modules and #u.modules > 0 then
      local mods = {}
      for k, m in ipairs(u.modules) do mods[k] = m == "" and "(root)" or m end
      lines[#lines + 1] = "  modules: " .. table.concat(mods, ", ")
    end
    if u.extra_modules and #u.extra_modules > 0 then
      lines[#lines + 1] = "  also used by: " .. table.concat(u.extra_modules, ", ")
    end
    local head = {"parameter", "shape", "dtype"}
    local right = {}
    for r = 0, W - 1 do head[#head + 1] = "rank " .. r; head[#head + 1] = ""; right[#head] = true end
    local rows = {head}
    for _, p in ipairs(u.params) do
      local row = {p.name, "[" .. table.concat(p.shape, ", ") .. "]", p.dtype}
      for r = 0, W - 1 do row[#row + 1] = range_str(p.ranges[r]); row[#row + 1] = bs(p.bytes[r]) end
      row[#row + 1] = p.tied and ("(tied: " .. table.concat(p.tied, " = ") .. ")") or ""
      rows[#rows + 1] = row
    end
    local total = {("%d param%s, %s elements"):format(#u.params, #u.params == 1 and "" or "s",
                                                     require("fsdp.nn.module").with_commas(u.numel)), "", ""}
    for r = 0, W - 1 do total[#total + 1] = ""; total[#total + 1] = bs(u.bytes[r]) end
    rows[#rows + 1] = total
    for _, l in ipairs(columns(rows, right)) do lines[#lines + 1] = "  " .. l:gsub("%s+$", "") end
  end
  if t.skipped and #t.skipped > 0 then
    lines[#lines + 1] = ""
    lines[#lines + 1] = ("(%s: no parameters left, so no unit)"):format(table.concat(t.skipped, ", "))
  end
  local text = table.concat(lines, "\n")
  if t.memory then text = text .. "\n\n" .. tostring(t.memory) end
  return text
end

ShardTable.__tostring = M.format

-- The table of a plan's units (explain.lua's): the units that hold parameters, as apply_plan makes them.
function M.from_plan(units, tensor_of, W, dim0_shard)
  local out, skipped = {}, {}
  for _, u in ipairs(units) do
    if #u.params == 0 then
      skipped[#skipped + 1] = u.is_root and "root" or u.name
    else
      local params = {}
      for j, pn in ipairs(u.params) do
        params[j] = M.param_row(pn, tensor_of[pn]:shape(), W, dim0_shard)
        if u.tied and u.tied[pn] then params[j].tied = u.tied[pn].names end
      end
      out[#out + 1] = {name = u.name, reshard_after_forward = u.reshard_after_forward, cpu_offload = u.cpu_offload,
                       mixed_precision = u.mixed_precision,
                       param_dtype = u.mixed_precision and u.mixed_precision.param_dtype or M.SHARD_DTYPE,
                       state = "sharded", modules = u.modules, extra_modules = u.extra_modules, params = params,
                       is_root = u.is_root}
    end
  end
  return M.new({what = "explain", world_size = W, units = out, skipped = skipped})
end

-- The table of a sharded model now: its engine units (units.lua's records), each rank's rows from the geometry
-- over the unit's shard group, this rank's checked against the engine's own (and kept as first_row, rows).
function M.from_group(model, group, dim0_shard)
  local name_of = {}   -- units made by fully_shard on a submodule know only local names
  for _, e in ipairs(model:full_parameter_list()) do name_of[e[2]] = e[1] end
  local names_of = {}  -- every name of a tied tensor, in module order (as plan.lua lists them)
  for path, m in model:named_modules() do
    for _, pn in ipairs(m._param_names) do
      local t = m._params[pn]
      names_of[t] = names_of[t] or {}
      local list = names_of[t]
      list[#list + 1] = path == "" and pn or (path .. "." .. pn)
    end
  end
  local units, W, rank = {}, nil, nil
  for i, u in ipairs(group.units) do
    local params = {}
    for j, e in ipairs(u.params) do
      local info = require("fsdp.tensor").shard_info(u.shards[j])
      local w, r = C.fl_comm_size(info.group), C.fl_comm_rank(info.group)
      if W and w ~= W then
        core.raise(("fsdp.shards: unit %s is sharded over %d ranks, an earlier one over %d"):format(u.name, w, W))
      end
      W, rank = w, r
      local p = M.param_row(name_of[e.full] or e.name, e.full:shape(), w, dim0_shard)
      local mine = p.ranges[r]
      if mine[1] ~= info.row0 or mine[2] ~= info.nrows then   -- the geometry is the engine's: a bug otherwise
        core.raise(("fsdp.shards: %s: rank %d holds rows [%d, %d), the shard geometry says [%d, %d)"):format(
          p.name, r, info.row0, info.row0 + info.nrows, mine[1], mine[1] + mine[2]))
      end
      p.first_row, p.rows = info.row0, info.nrows   -- this rank's

      if #names_of[e.full] > 1 then p.tied = names_of[e.full] end
      params[j] = p
    end
    local unsharded = C.fl_fsdp_is_unsharded(u.ptr)
    units[i] = {name = u.name, reshard_after_forward = u.reshard_after_forward, cpu_offload = u.cpu_offload,
                mixed_precision = u.mixed_precision, param_dtype = u.param_dtype,
                state = unsharded and "gathered" or "sharded", unsharded = unsharded, params = params,
                modules = u.modules, extra_modules = u.extra_modules, is_root = u.is_root}
  end
  return M.new({what = "shards", world_size = W or 1, rank = rank or 0, units = units})
end

return M
