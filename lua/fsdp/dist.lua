-- lua/fsdp/dist.lua: joining the job, process groups (Comm) and collectives with async handles (Work), over the
-- engine's fl_comm (engine/dist/comm.c); device meshes are lua/fsdp/parallel/mesh.lua's. Ranks are 0-based everywhere, as in MPI and torch.
--
--   local dist = require "fsdp.dist"          -- also fsdp.dist; fsdp.init/world_size/rank/mesh/barrier
--   dist.init{seed = 1234, timeout = 60}      -- idempotent; fine with one rank (no MPI then)
--   dist.all_reduce(t, {op = "avg", group = mesh.dp_shard})
--   local w = dist.all_gather(out, shard, {group = mesh.dp_shard, async = true}); ...; w:wait()
--
-- A group is a Comm, a 1-D Mesh (a mesh dim such as mesh.dp_shard, or a flattened dim), or nil for the world.
-- Collectives take contiguous CPU tensors; a rank whose dtype, size, op or root differs makes the collective fail
-- on every rank with a message naming it. A collective not completed after the group's timeout (default 600 s)
-- aborts the whole job naming the collective, the group and the rank.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"

local C = core.C
local M = {}

local REDUCE = core.reduce_ops   -- from the engine header (enum fl_reduce_op)
local seed_value = nil

-- ---- joining the job ----

local function world_ptr()
  if not C.fl_dist_is_initialized() then
    if C.fl_dist_init(0) < 0 then core.raise("fsdp.init: " .. core.last_error()) end
  end
  return C.fl_comm_world()
end

local Comm = {}
Comm.__index = Comm
M.Comm = Comm

local world_comm = nil
local function world()
  local p = world_ptr()
  if world_comm == nil or world_comm._p ~= p then world_comm = setmetatable({_p = p}, Comm) end
  return world_comm
end

local INIT_OPTS = {seed = true, timeout = true}

-- init{seed =, timeout =}: joins the ranks started by the launcher (world size 1 without one). `timeout` (seconds)
-- is the world group's collective timeout; groups split later inherit it. `seed` is the run's base seed: every
-- rank must pass the same one (checked), and dist.seed() returns it. Calling init again updates both.
function M.init(opts)
  opts = core.check_opts("fsdp.init", opts, INIT_OPTS, 2)
  local t, s = opts.timeout, opts.seed
  if t ~= nil and (type(t) ~= "number" or not (t > 0)) then  -- luacheck: ignore 581 (not > also rejects NaN)
    error(("fsdp.init: timeout must be a positive number of seconds, got %s"):format(tostring(t)), 2)
  end
  if s ~= nil and (type(s) ~= "number" or s ~= math.floor(s) or s < 0 or s >= 2^53) then
    error(("fsdp.init: seed must be an integer in [0, 2^53), got %s"):format(tostring(s)), 2)
  end
  if not C.fl_dist_is_initialized() then
    if C.fl_dist_init(t or 0) < 0 then error("fsdp.init: " .. core.last_error(), 2) end
  end
  local w = world()
  if t then C.fl_comm_set_timeout(w._p, t) end
  -- Every rank shows the others its seed (-1: none), so that a seed drawn per rank (os.time()) fails here and
  -- not as diverging models later.
  local n = C.fl_comm_size(w._p)
  if n > 1 then
    local mine = Tensor.full({1}, s or -1, {dtype = "f64"})
    local all = Tensor.zeros({n}, {dtype = "f64"})
    if C.fl_all_gather(w._p, all._p, mine._p) < 0 then error("fsdp.init: " .. core.last_error(), 2) end
    local v = all:totable()
    for r = 2, n do
      if v[r] ~= v[1] then
        local function show(x) return x < 0 and "no seed" or ("seed %d"):format(x) end
        error(("fsdp.init: rank %d passed %s but rank 0 passed %s; every rank must pass the same seed")
              :format(r - 1, show(v[r]), show(v[1])), 2)
      end
    end
  end
  if s then seed_value = s end
end

function M.is_initialized() return C.fl_dist_is_initialized() end
function M.seed() return seed_value end
function M.world_size() return C.fl_comm_size(world()._p) end
function M.rank() return C.fl_comm_rank(world()._p) end
function M.world() return world() end

-- Ends every rank of the job at once, printing msg prefixed with this rank.
function M.abort(msg, code) C.fl_dist_abort(code or 1, msg and tostring(msg) or nil) end

-- Collective time (seconds spent issuing and waiting, since the last reset) and the bench's switch that makes
-- every collective return at once without communicating.
function M.comm_time() return C.fl_comm_time_total() end
-- Seconds the communication thread spent executing collectives: the total communication time.
function M.comm_busy_time() return C.fl_comm_busy_time() end
function M.reset_comm_time() C.fl_comm_time_reset() end
function M.set_skip_comm(on) C.fl_comm_set_skip(on and true or false) end

-- ---- groups ----

local function new_comm(p)
  return setmetatable({_p = ffi.gc(p, C.fl_comm_release)}, Comm)
end

function Comm:rank() return C.fl_comm_rank(self._p) end
function Comm:size() return C.fl_comm_size(self._p) end
function Comm:name() return ffi.string(C.fl_comm_name(self._p)) end
function Comm:global_rank(r) return C.fl_comm_global_rank(self._p, r) end
function Comm:timeout() return C.fl_comm_get_timeout(self._p) end
function Comm:set_timeout(s)
  if type(s) ~= "number" or not (s > 0) then  -- luacheck: ignore 581 (not > also rejects NaN)
    error(("set_timeout: expected a positive number of seconds, got %s"):format(tostring(s)), 2)
  end
  C.fl_comm_set_timeout(self._p, s)
end
-- The world ranks of the members, in group-rank order.
function Comm:ranks()
  local r = {}
  for i = 0, self:size() - 1 do r[i + 1] = self:global_rank(i) end
  return r
end
function Comm:__tostring()
  return ("Comm('%s', rank %d of %d)"):format(self:name(), self:rank(), self:size())
end

-- Splits this group (collective over it): ranks passing the same color form a group ordered by key.
function Comm:split(color, key, name)
  local p = C.fl_comm_split(self._p, color, key or self:rank(), name)
  if p == nil then error(core.last_error(), 2) end
  return new_comm(p)
end

-- Every rank passes the same dtype and element count (of a tensor, or given), or all fail naming the first
-- rank that differs.
function Comm:check(what, t, numel)
  local dt, n
  if Tensor.is_tensor(t) then dt, n = t._p.dtype, t:numel()
  else dt, n = core.dtype_id(t, "check"), numel end
  core.check(C.fl_comm_check(self._p, what, dt, n), nil, 2)
end

local Mesh = {}

-- The group a collective runs on: nil (world), a Comm, or a 1-D Mesh.
local function resolve(group, what, level)
  if group == nil then return world() end
  local mt = getmetatable(group)
  if mt == Comm then return group end
  if mt == Mesh then
    if #group._names ~= 1 then
      error(("%s: a %d-D mesh (%s) is not a group; pass a 1-D submesh such as mesh.%s")
            :format(what, #group._names, table.concat(group._names, ", "), group._names[#group._names]), level + 1)
    end
    return group._comm
  end
  error(("%s: group must be a Comm, a 1-D mesh or nil (world), got %s"):format(what, type(group)), level + 1)
end
function M.group(g) return (resolve(g, "group", 2)) end

-- The fl_comm * of a group (borrowed: keep the Lua group alive while C holds it).
function M.comm_ptr(group) return resolve(group, "comm_ptr", 2)._p end

-- ---- async handles ----

local Work = {}
Work.__index = Work
M.Work = Work

local function new_work(p, what, refs)
  return setmetatable({_p = ffi.gc(p, C.fl_work_wait), what = what, refs = refs}, Work)
end

-- Completes the collective (blocking) and raises its error, if any. A handle can be waited once.
function Work:wait()
  local p = self._p
  if p == nil then error(self.what .. ": work already waited", 2) end
  ffi.gc(p, nil)
  self._p, self.refs = nil, nil
  if C.fl_work_wait(p) < 0 then error(core.last_error(), 2) end
end

-- True once the collective has completed (it still needs :wait()).
function Work:is_completed()
  if self._p == nil then return true end
  return C.fl_work_test(self._p)
end

-- ---- collectives ----

local function tensor_arg(t, what, name, level)
  if not Tensor.is_tensor(t) then
    error(("%s: %s must be a tensor, got %s"):format(what, name, type(t)), level + 1)
  end
  if t._p == nil then error(("%s: %s was freed"):format(what, name), level + 1) end
  return t._p
end

local function reduce_op(op, what, level)
  if op == nil then return REDUCE.sum end
  local id = REDUCE[op]
  if not id then error(("%s: unknown op '%s' (valid: sum, avg, max)"):format(what, tostring(op)), level + 1) end
  return id
end

local function rank_arg(r, what, name, level)
  if type(r) ~= "number" or r ~= math.floor(r) then
    error(("%s: %s must be an integer rank (0-based), got %s"):format(what, name, tostring(r)), level + 1)
  end
  return r
end

-- Either returns a Work (opts.async) or waits here; C errors are raised at the user's line.
local function finish(p, what, async, refs, level)
  if p == nil then error(core.last_error(), level + 1) end
  local w = new_work(p, what, refs)
  if async then return w end
  ffi.gc(p, nil)
  w._p = nil
  if C.fl_work_wait(p) < 0 then error(core.last_error(), level + 1) end
end

local GATHER_OPTS = {group = true, async = true}
local REDUCE_OPTS = {group = true, async = true, op = true}
local P2P_OPTS = {group = true, async = true, tag = true}

-- The implementations take the group `c` (nil: opts.group) and the error level `lvl` of the user's line as seen
-- from them (3: they are called by the public function or method, which the user called).

local function group_of(c, opts, what, lvl)
  if c == nil then return resolve(opts.group, what, lvl) end
  if opts.group ~= nil then error(what .. ": opts.group given to a group's own method", lvl) end
  return c
end

local function all_gather(c, out, input, opts, lvl)
  opts = core.check_opts("all_gather", opts, GATHER_OPTS, lvl)
  c = group_of(c, opts, "all_gather", lvl)
  local po, pi = tensor_arg(out, "all_gather", "out", lvl), tensor_arg(input, "all_gather", "input", lvl)
  return (finish(C.fl_all_gather_async(c._p, po, pi), "all_gather", opts.async, {out, input, c}, lvl))
end

local function reduce_scatter(c, out, input, opts, lvl)
  opts = core.check_opts("reduce_scatter", opts, REDUCE_OPTS, lvl)
  c = group_of(c, opts, "reduce_scatter", lvl)
  local op = reduce_op(opts.op, "reduce_scatter", lvl)
  local po, pi = tensor_arg(out, "reduce_scatter", "out", lvl), tensor_arg(input, "reduce_scatter", "input", lvl)
  return (finish(C.fl_reduce_scatter_async(c._p, po, pi, op), "reduce_scatter", opts.async, {out, input, c}, lvl))
end

local function all_reduce(c, t, opts, lvl)
  opts = core.check_opts("all_reduce", opts, REDUCE_OPTS, lvl)
  c = group_of(c, opts, "all_reduce", lvl)
  local op = reduce_op(opts.op, "all_reduce", lvl)
  return (finish(C.fl_all_reduce_async(c._p, tensor_arg(t, "all_reduce", "tensor", lvl), op), "all_reduce",
                opts.async, {t, c}, lvl))
end

local function broadcast(c, t, root, opts, lvl)
  opts = core.check_opts("broadcast", opts, GATHER_OPTS, lvl)
  c = group_of(c, opts, "broadcast", lvl)
  local p = tensor_arg(t, "broadcast", "tensor", lvl)
  return (finish(C.fl_broadcast_async(c._p, p, rank_arg(root, "broadcast", "root", lvl)), "broadcast", opts.async,
                {t, c}, lvl))
end

local function barrier(c, opts, lvl)
  opts = core.check_opts("barrier", opts, GATHER_OPTS, lvl)
  c = group_of(c, opts, "barrier", lvl)
  return (finish(C.fl_barrier_async(c._p), "barrier", opts.async, {c}, lvl))
end

local function tag_arg(opts, what, lvl)
  local tag = opts.tag or 0
  if type(tag) ~= "number" or tag ~= math.floor(tag) then
    error(("%s: tag must be an integer, got %s"):format(what, tostring(tag)), lvl + 1)
  end
  return tag
end

local function send(c, t, dst, opts, lvl)
  opts = core.check_opts("send", opts, P2P_OPTS, lvl)
  c = group_of(c, opts, "send", lvl)
  local p = tensor_arg(t, "send", "tensor", lvl)
  return (finish(C.fl_send_async(c._p, p, rank_arg(dst, "send", "dst", lvl), tag_arg(opts, "send", lvl)), "send",
                opts.async, {t, c}, lvl))
end

local function recv(c, t, src, opts, lvl)
  opts = core.check_opts("recv", opts, P2P_OPTS, lvl)
  c = group_of(c, opts, "recv", lvl)
  local p = tensor_arg(t, "recv", "tensor", lvl)
  return (finish(C.fl_recv_async(c._p, p, rank_arg(src, "recv", "src", lvl), tag_arg(opts, "recv", lvl)), "recv",
                opts.async, {t, c}, lvl))
end

-- Every collective waits unless opts.async, when it returns a Work. (The parentheses keep these from being tail
-- calls, so that error levels count the frame.)
-- all_gather(out, input, {group=, async=}): out holds size * numel(input) elements, rank-major.
function M.all_gather(out, input, opts) return (all_gather(nil, out, input, opts, 3)) end
-- reduce_scatter(out, input, {op = "sum"|"avg"|"max", group=, async=}): input holds size * numel(out) elements;
-- rank r gets the reduction of chunk r.
function M.reduce_scatter(out, input, opts) return (reduce_scatter(nil, out, input, opts, 3)) end
-- all_reduce(t, {op =, group=, async=}): in place; op defaults to "sum".
function M.all_reduce(t, opts) return (all_reduce(nil, t, opts, 3)) end
-- broadcast(t, root, {group=, async=}): root is a rank of the group.
function M.broadcast(t, root, opts) return (broadcast(nil, t, root, opts, 3)) end
function M.barrier(opts) return (barrier(nil, opts, 3)) end
-- send(t, dst, {tag = 0, group=, async=}) / recv(t, src, {...}): point to point; recv checks the size it got.
function M.send(t, dst, opts) return (send(nil, t, dst, opts, 3)) end
function M.recv(t, src, opts) return (recv(nil, t, src, opts, 3)) end

-- The same as methods of a group: comm:all_reduce(t, {op = "avg"}) (opts.group is then an error).
function Comm:all_gather(out, input, opts) return (all_gather(self, out, input, opts, 3)) end
function Comm:reduce_scatter(out, input, opts) return (reduce_scatter(self, out, input, opts, 3)) end
function Comm:all_reduce(t, opts) return (all_reduce(self, t, opts, 3)) end
function Comm:broadcast(t, root, opts) return (broadcast(self, t, root, opts, 3)) end
function Comm:barrier(opts) return (barrier(self, opts, 3)) end
function Comm:send(t, dst, opts) return (send(self, t, dst, opts, 3)) end
function Comm:recv(t, src, opts) return (recv(self, t, src, opts, 3)) end

-- ---- meshes (lua/fsdp/parallel/mesh.lua builds them; the Mesh type lives here because groups may be meshes) ----
M.Mesh = Mesh
M._world, M._resolve = world, resolve   -- for parallel/mesh.lua
function M.mesh(spec) return require("fsdp.parallel.mesh").mesh(spec) end
function M.mesh_comms(mesh) return require("fsdp.parallel.mesh").mesh_comms(mesh) end

return M
