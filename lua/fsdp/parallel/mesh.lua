-- lua/fsdp/parallel/mesh.lua: device meshes (fsdp.mesh), as torch's init_device_mesh: n-D arrangements of the
-- ranks whose 1-D submeshes are process groups (fsdp.dist's Comm), flattening, and the data-parallel groups of
-- a mesh (mesh_comms). Collectives themselves are fsdp.dist's.
local core = require "fsdp.core"
local dist = require "fsdp.dist"

local M = {}
local Mesh, world, resolve = dist.Mesh, dist._world, dist._resolve
local mesh_methods = {}

-- ---- meshes ----
--
-- mesh{dp_shard = -1}, mesh{dp_replicate = 2, dp_shard = 4} or mesh{{"dp_replicate", 2}, {"dp_shard", 4}}.
-- Ranks are laid out row-major over the dims in order (the last dim varies fastest), as torch's
-- init_device_mesh: with dims (dp_replicate = 2, dp_shard = 4), rank 5 has coordinate (1, 1), and mesh.dp_shard
-- on rank 5 is the group of ranks 4, 5, 6, 7. The order of the dims is the array's in the array form. A Lua hash
-- table has no order, so the table form orders the dims canonically: pp, dp_replicate, dp_shard, cp, tp (the
-- outer-to-inner order torchtitan uses), then any other names sorted alphabetically. One size may be -1: it is
-- inferred from the world size. Every 1-D submesh is created (a collective) when the mesh is made.

local CANONICAL = {"pp", "dp_replicate", "dp_shard", "cp", "tp"}
local CANONICAL_RANK = {}
for i, n in ipairs(CANONICAL) do CANONICAL_RANK[n] = i end

Mesh.__index = function(m, k)
  local f = mesh_methods[k]
  if f then return f end
  local sub = rawget(m, "_dims")[k]
  if sub then return sub end
  local names = {}
  for n in pairs(rawget(m, "_dims")) do names[#names + 1] = n end
  table.sort(names)
  error(("mesh: no dim '%s' (dims: %s)"):format(tostring(k), table.concat(names, ", ")), 2)
end
Mesh.__newindex = function(_, k) error(("mesh: cannot set field '%s'"):format(tostring(k)), 2) end

local function dims_str(names, sizes)
  local p = {}
  for i, n in ipairs(names) do p[i] = ("%s=%d"):format(n, sizes[i]) end
  return table.concat(p, " x ")
end

-- Normalises the two spec forms into ordered names and sizes.
local function parse_spec(spec)
  if type(spec) ~= "table" then core.raise(("mesh: expected a table of dims, got %s"):format(type(spec))) end
  local names, sizes = {}, {}
  local n_array = #spec
  if n_array > 0 then
    for k in pairs(spec) do
      if type(k) ~= "number" then
        core.raise(("mesh: mixes the array form {{name, size}, ...} with the key '%s'; use one form"):format(tostring(k)))
      end
    end
    for i = 1, n_array do
      local d = spec[i]
      if type(d) ~= "table" or #d ~= 2 then
        core.raise(("mesh: dim %d must be a {name, size} pair, got %s"):format(i, type(d)))
      end
      names[i], sizes[i] = d[1], d[2]
    end
  else
    for k in pairs(spec) do names[#names + 1] = k end
    for _, k in ipairs(names) do
      if type(k) ~= "string" then core.raise(("mesh: dim names must be strings, got %s"):format(tostring(k))) end
    end
    table.sort(names, function(a, b)
      local ra, rb = CANONICAL_RANK[a], CANONICAL_RANK[b]
      if ra and rb then return ra < rb end
      if ra or rb then return ra ~= nil end
      return a < b
    end)
    for i, k in ipairs(names) do sizes[i] = spec[k] end
  end
  if #names == 0 then core.raise("mesh: no dims given (e.g. fsdp.mesh{dp_shard = -1})") end
  return names, sizes
end

local function check_name(name, taken, level, what)
  what = what or "mesh"
  if type(name) ~= "string" or not name:match("^[%a_][%w_]*$") then
    error(("%s: dim name %s is not an identifier"):format(what, tostring(name)), level + 1)
  end
  if mesh_methods[name] then
    error(("%s: dim name '%s' is also a Mesh method; choose another name"):format(what, name), level + 1)
  end
  if taken[name] then
    error((what == "mesh" and "%s: dim '%s' appears twice" or "%s: '%s' is already a dim of this mesh")
          :format(what, name), level + 1)
  end
  taken[name] = true
end

-- Row-major strides of sizes, and the coordinates of `rank`.
local function coords_of(rank, sizes)
  local c, rem = {}, rank
  for i = #sizes, 1, -1 do
    c[i] = rem % sizes[i]
    rem = (rem - c[i]) / sizes[i]
  end
  return c
end

-- A 1-D mesh over the ranks that share every coordinate outside `dims` (indices into root's dims), ordered
-- row-major over `dims`. Collective over the world.
local function submesh(root, dims, name)
  local coord, sizes = root._coord, root._sizes
  local inside = {}
  for _, d in ipairs(dims) do inside[d] = true end
  local color, key, size = 0, 0, 1
  for d = 1, #sizes do
    if inside[d] then key = key * sizes[d] + coord[d]; size = size * sizes[d]
    else color = color * sizes[d] + coord[d] end
  end
  local comm = world():split(color, key, name)
  assert(comm:size() == size and comm:rank() == key, "mesh: split gave an unexpected group")
  return setmetatable({_names = {name}, _sizes = {size}, _coord = {key}, _comm = comm, _dims = {}}, Mesh)
end

-- fsdp.mesh(spec): see above.
function M.mesh(spec)
  local names, sizes = parse_spec(spec)
  local taken = {}
  local infer = nil
  for i, n in ipairs(names) do
    check_name(n, taken, 2)
    local s = sizes[i]
    if type(s) ~= "number" or s ~= math.floor(s) or (s < 1 and s ~= -1) then
      error(("mesh: size of dim '%s' must be a positive integer or -1, got %s"):format(n, tostring(s)), 2)
    end
    if s == -1 then
      if infer then error(("mesh: dims '%s' and '%s' are both -1; at most one can be inferred"):format(names[infer], n), 2) end
      infer = i
    end
  end
  local w = world()
  local ws = w:size()
  local known, others, osizes = 1, {}, {}
  for i, s in ipairs(sizes) do
    if i ~= infer then known = known * s; others[#others + 1] = names[i]; osizes[#osizes + 1] = s end
  end
  if infer then
    if ws % known ~= 0 then
      error(("mesh: cannot infer dim '%s': world size %d is not divisible by the other dims (%s = %d)")
            :format(names[infer], ws, dims_str(others, osizes), known), 2)
    end
    sizes[infer] = ws / known
  elseif known ~= ws then
    error(("mesh: dims %s make %d ranks, but the world size is %d"):format(dims_str(names, sizes), known, ws), 2)
  end
  local m = setmetatable({_names = names, _sizes = sizes, _coord = coords_of(w:rank(), sizes), _comm = w,
                          _dims = {}}, Mesh)
  if #names == 1 then
    -- the 1-D mesh over the world is its own dim (mesh.dp_shard == mesh)
    local sub = submesh(m, {1}, names[1])
    rawset(m, "_comm", sub._comm)
    m._dims[names[1]] = m
  else
    for d = 1, #names do m._dims[names[d]] = submesh(m, {d}, names[d]) end
  end
  return m
end

-- mesh:flatten({"dp_replicate", "dp_shard"}, "dp"): a 1-D mesh merging those dims (given in mesh order), over
-- the ranks that share the other coordinates; afterwards also reachable as mesh.dp.
function mesh_methods.flatten(m, dims, name)
  if type(dims) ~= "table" or #dims == 0 then error("flatten: expected a list of dim names", 2) end
  local idx, pos = {}, {}
  for i, n in ipairs(m._names) do pos[n] = i end
  for i, n in ipairs(dims) do
    local p = pos[n]
    if not p then
      error(("flatten: mesh has no dim '%s' (dims: %s)"):format(tostring(n), table.concat(m._names, ", ")), 2)
    end
    if i > 1 and p <= idx[i - 1] then
      error(("flatten: dims must be distinct and in mesh order (%s), got %s")
            :format(table.concat(m._names, ", "), table.concat(dims, ", ")), 2)
    end
    idx[i] = p
  end
  local taken = {}
  for n in pairs(m._dims) do taken[n] = true end
  check_name(name, taken, 2, "flatten")
  local sub = submesh(m, idx, name)
  m._dims[name] = sub
  return sub
end

-- size() is the number of ranks in the mesh; size(name) the size of one dim.
function mesh_methods.size(m, name)
  if name == nil then
    local n = 1
    for _, s in ipairs(m._sizes) do n = n * s end
    return n
  end
  for i, n in ipairs(m._names) do if n == name then return m._sizes[i] end end
  error(("size: mesh has no dim '%s' (dims: %s)"):format(tostring(name), table.concat(m._names, ", ")), 2)
end

-- coordinate() is this rank's 0-based coordinates in dim order; coordinate(name) one of them.
function mesh_methods.coordinate(m, name)
  if name == nil then return {unpack(m._coord)} end
  for i, n in ipairs(m._names) do if n == name then return m._coord[i] end end
  error(("coordinate: mesh has no dim '%s' (dims: %s)"):format(tostring(name), table.concat(m._names, ", ")), 2)
end

function mesh_methods.names(m) return {unpack(m._names)} end
function mesh_methods.shape(m) return {unpack(m._sizes)} end
function mesh_methods.ndim(m) return #m._names end
-- This rank's index in the mesh (row-major over its dims).
function mesh_methods.rank(m) return m._comm:rank() end
-- The world ranks of the mesh's members, in mesh order.
function mesh_methods.ranks(m) return m._comm:ranks() end
-- The group of a 1-D mesh (an n-D mesh has none: pick a dim or flatten).
function mesh_methods.group(m) return (resolve(m, "group", 2)) end

-- The data-parallel groups of a mesh, as fl_comm pointers (borrowed: the mesh owns them, keep it alive):
-- (shard, replicate). nil gives the world and no replicate group; a 1-D mesh shards over its only dim; a 2-D
-- mesh must be {dp_replicate, dp_shard} (HSDP: shard over dp_shard, replicate over dp_replicate).
function M.mesh_comms(mesh)
  if mesh == nil then return world()._p, nil end
  if getmetatable(mesh) ~= Mesh then
    error(("mesh_comms: expected a mesh from fsdp.mesh, got %s"):format(type(mesh)), 2)
  end
  local names = mesh._names
  if #names == 1 then return mesh._comm._p, nil end
  for _, n in ipairs(names) do
    if n ~= "dp_shard" and n ~= "dp_replicate" then
      error(("mesh_comms: dim '%s' is not data-parallel; a mesh for data parallelism has dp_shard and optionally "
             .. "dp_replicate (dims: %s); pass mesh:flatten({...}, name) or a 1-D submesh"):format(n, table.concat(names, ", ")), 2)
    end
  end
  return mesh._dims.dp_shard._comm._p, mesh._dims.dp_replicate._comm._p
end

Mesh.__tostring = function(m)
  return ("Mesh(%s; coordinate %s)"):format(dims_str(m._names, m._sizes), table.concat(m._coord, ", "))
end

return M
