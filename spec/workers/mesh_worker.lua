-- spec/workers/mesh_worker.lua: device meshes on the real ranks of one job (run with 4 ranks): layouts, submesh
-- memberships, flattening, collectives over mesh dims and the errors. Each rank writes what it saw.
-- Usage: fsdp-lua -n 4 mesh_worker.lua DIR
local fsdp = require "fsdp"
local D    = require "dist"
local dist = fsdp.dist

local dir = arg[1]
fsdp.init{}
local r = fsdp.rank()
local res = {rank = r}

local function describe_mesh(m)
  local d = {names = m:names(), shape = m:shape(), coordinate = m:coordinate(), size = m:size(), subs = {}}
  for _, name in ipairs(m:names()) do
    local s = m[name]
    d.subs[name] = {ranks = s:ranks(), rank = s:rank(), size = s:size(), group = s:group():name()}
  end
  return d
end

-- 2 x 2, table form: dp_replicate outer, dp_shard inner (canonical order, whatever the table's order)
local m = fsdp.mesh{dp_shard = 2, dp_replicate = 2}
res.hsdp = describe_mesh(m)
res.hsdp.size_shard, res.hsdp.coord_shard = m:size("dp_shard"), m:coordinate("dp_shard")

-- collectives over the dims: dp_shard groups {0,1},{2,3}; dp_replicate groups {0,2},{1,3}
local t = fsdp.full({1}, r)
dist.all_reduce(t, {group = m.dp_shard})
res.sum_shard = t:item()
t = fsdp.full({1}, r)
m.dp_replicate:group():all_reduce(t)
res.sum_replicate = t:item()
local out = fsdp.zeros({2})
dist.all_gather(out, fsdp.full({1}, r), {group = m.dp_replicate})
res.gather_replicate = out:totable()

-- flatten both dims into "dp": all four ranks, reachable as m.dp afterwards
local dp = m:flatten({"dp_replicate", "dp_shard"}, "dp")
res.flat = {ranks = dp:ranks(), rank = dp:rank(), same = rawequal(m.dp, dp), names = dp:names()}
t = fsdp.full({1}, r)
dist.all_reduce(t, {group = m.dp})
res.sum_flat = t:item()

-- array form keeps the given order: dp_shard outer now
res.swapped = describe_mesh(fsdp.mesh{{"dp_shard", 2}, {"dp_replicate", 2}})
-- canonical order of known names, others after them sorted
res.order_known = fsdp.mesh{tp = 2, dp_shard = 2}:names()
res.order_other = fsdp.mesh{zeta = 2, alpha = 2}:names()
res.order_mixed = fsdp.mesh{expert = 2, dp_replicate = 2}:names()
-- -1 is inferred; a 1-D mesh is its own dim; three dims with a size-1 dim in the middle
local inferred = fsdp.mesh{dp_replicate = 2, dp_shard = -1}
res.inferred = inferred:shape()
local one = fsdp.mesh{dp_shard = -1}
res.one_d = {shape = one:shape(), same = rawequal(one.dp_shard, one), ranks = one:ranks(), group = one:group():name()}
res.three = describe_mesh(fsdp.mesh{{"a", 2}, {"b", 1}, {"c", 2}})
res.three_flat = fsdp.mesh{{"a", 2}, {"b", 1}, {"c", 2}}:flatten({"a", "c"}, "ac"):ranks()

-- errors (every rank raises the same one, before any communication)
local function err(f, ...) local ok, e = pcall(f, ...); return ok and "no error" or e end
res.err_product = err(fsdp.mesh, {dp_replicate = 3, dp_shard = 2})
res.err_infer = err(fsdp.mesh, {dp_replicate = 3, dp_shard = -1})
res.err_two_infer = err(fsdp.mesh, {dp_replicate = -1, dp_shard = -1})
res.err_size = err(fsdp.mesh, {dp_shard = 0})
res.err_mixed_forms = err(fsdp.mesh, {{"dp_shard", 2}, tp = 2})
res.err_dup = err(fsdp.mesh, {{"dp_shard", 2}, {"dp_shard", 2}})
res.err_method_name = err(fsdp.mesh, {size = 4})
res.err_empty = err(fsdp.mesh, {})
res.err_unknown_dim = err(function() return m.tp end)
res.err_nd_group = err(dist.all_reduce, fsdp.zeros({1}), {group = m})
res.err_flatten_order = err(m.flatten, m, {"dp_shard", "dp_replicate"}, "x")
res.err_flatten_unknown = err(m.flatten, m, {"dp_shard", "cp"}, "x")
res.err_flatten_taken = err(m.flatten, m, {"dp_shard"}, "dp")

fsdp.barrier()
D.write(dir, r, res)
