-- lua/fsdp/checkpoint/train.lua: training checkpoints — save(dir, {...}) and load(dir, {...}) of everything a run
-- needs to go on as if it had never stopped: the f32 master weights, the optimizer state and hyper-parameters, the
-- step, the LR schedule, every random stream and the data loader's position; loadable at another world size or plan.
-- Hugging Face exports are checkpoint/hf.lua's; atomic publishing is checkpoint/publish.lua's; the bulk bytes are
-- the engine's (engine/io/safetensors.c, and engine/io/async_write.c for background writes).
--
-- Layout of a checkpoint directory:
--   metadata.json                      format and version, world size, mode (plain, ddp, fsdp), mesh, plan; every
--                                      rank file with its size and CRC32C (`files`); for every tensor its global
--                                      shape, dtype and pieces (which rank's file holds which element range = row
--                                      range); the optimizer's type, param groups and per-parameter steps; step,
--                                      schedule, loader, RNG and the caller's `extra`. Written last, once every
--                                      rank file is written and its checksum known.
--   rank-0000R-of-0000W.safetensors    rank R's pieces: `model.<name>` and `optim.<name>.<state>` (exp_avg,
--                                      exp_avg_sq, momentum_buffer), each of shape [rows, ...] of the global tensor.
-- Pieces. Every rank reports the element range it holds of each parameter (an FSDP shard: its dim-0 rows, one
-- contiguous range; DDP and plain: the whole tensor). Ranks holding the same range (DDP replicas, HSDP replicas of
-- a shard) split its rows evenly (fl_shard_rows) and each writes its part, so a replicated model is written once,
-- by all ranks in parallel, and no rank gathers anything. Loading reads, for each range this rank now holds, the
-- overlapping part of every piece: one contiguous byte range per overlap, whatever the old and new world sizes.
-- Checksums. Each rank's writer computes its file's CRC32C over the bytes as it writes them (engine/io); rank 0
-- gathers them into metadata.json. Load first verifies every file (each rank a share of them, one read each) and
-- the ranks agree before anything is read into the model: a damaged file is named, and nothing has changed.
--
-- Test hooks (environment variables, read at each save; not for production use):
--   FSDP_CHECKPOINT_TEST_KILL=R[:N]      rank R kills itself (SIGKILL) after writing its file of its N-th sync save
--                                        (default the first) in this process, before the ranks agree: a save
--                                        killed midway.
--   FSDP_CHECKPOINT_TEST_WRITE_DELAY=S   an async writer waits S seconds before writing: a write in flight.
local ffi     = require "ffi"
local cjson   = require "cjson"
local core    = require "fsdp.core"
local Tensor  = require "fsdp.tensor"
local st      = require "fsdp.safetensors"
local publish = require "fsdp.checkpoint.publish"
local keys    = require "fsdp.dropout_keys"

local C = core.C
local M = {}

M.FORMAT, M.VERSION = "fsdp-lua training checkpoint", 1
M.METADATA = "metadata.json"

-- Optimizer state tensors a checkpoint knows (AdamW's and SGD's); `step` is a number beside them.
local STATE_TENSORS = {"exp_avg", "exp_avg_sq", "momentum_buffer"}
local STATE_BIT = {}
for i, n in ipairs(STATE_TENSORS) do STATE_BIT[n] = 2 ^ (i - 1) end
local HAS_STATE = 2 ^ #STATE_TENSORS   -- the bit above them: a state exists (SGD without momentum has only a step)
local ELEM = {f32 = 4, f64 = 8, bf16 = 2, f16 = 2}

pcall(ffi.cdef, "int kill(int pid, int sig);")

local function dist() return require "fsdp.dist" end

local function file_name(r, world) return ("rank-%05d-of-%05d.safetensors"):format(r, world) end

-- The names a checkpoint owns in its directory (replaced on save; anything else there is kept).
local function owned(name)
  return name == M.METADATA or name:match("^rank%-%d%d%d%d%d%-of%-%d%d%d%d%d%.safetensors$") ~= nil
end
M.owned = owned

-- This rank and the world size, without joining a job (one process under plain luajit).
local function world_info()
  if not C.fl_dist_is_initialized() then return 0, 1 end
  local w = C.fl_comm_world()
  return C.fl_comm_rank(w), C.fl_comm_size(w)
end

-- Every rank says whether its part succeeded; when one failed, its message reaches every rank and every rank
-- raises: the failing rank its own error, the others "<what>: rank R failed: <its message>". Two small collectives
-- on success, so a rank that failed alone never leaves the others waiting in a later collective.
local function agree(ok, err, what, collective)
  if not collective then
    if not ok then error(err, 0) end
    return
  end
  local D = dist()
  local n, r = D.world_size(), D.rank()
  local flag = Tensor.new({ok and 0 or (n - r)}, {dtype = "i64"})
  D.all_reduce(flag, {op = "max"})
  local v = flag:get(0)
  if v == 0 then return end
  local bad = n - v
  local msg = ok and "" or tostring(err)
  local len = Tensor.new({r == bad and #msg or 0}, {dtype = "i64"})
  D.broadcast(len, bad)
  local nbytes = len:get(0)
  local buf = Tensor.zeros({math.max(nbytes, 1)}, {dtype = "u8"})
  if r == bad then ffi.copy(buf:data_ptr(), msg, nbytes) end
  D.broadcast(buf, bad)
  if not ok then error(err, 0) end
  core.raise(("%s: rank %d failed: %s"):format(what, bad, ffi.string(buf:data_ptr(), nbytes)))
end

-- Every rank's file as metadata.json lists it, {name =, bytes =, crc32c = 8 hex digits}, from this rank's CRC32C
-- and size (one all-gather; one process: itself).
local function gather_files(crc, size, world, collective)
  local v = {crc, size}
  if collective then
    local D = dist()
    local all = Tensor.zeros({2 * world}, {dtype = "i64"})
    D.all_gather(all, Tensor.new(v, {dtype = "i64"}))
    v = all:tolist()
  end
  local files = {}
  for r = 0, world - 1 do
    files[r + 1] = {name = file_name(r, world), bytes = v[2 * r + 2], crc32c = ("%08x"):format(v[2 * r + 1])}
  end
  return files
end

-- ---- JSON ----

-- Values that survive metadata.json exactly: strings, booleans, finite numbers, lists and string-keyed tables.
local function check_json(v, path, what, depth)
  local t = type(v)
  if t == "string" or t == "boolean" then return end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      core.raise(("%s: %s is %s, which JSON cannot hold"):format(what, path, tostring(v)))
    end
    return
  end
  if t ~= "table" or getmetatable(v) ~= nil then
    core.raise(("%s: %s is a %s; it must hold JSON values (strings, finite numbers, booleans, lists, string-keyed "
                .. "tables)"):format(what, path, t == "table" and "table with a metatable" or t))
  end
  if depth > 32 then core.raise(("%s: %s nests deeper than 32 (a cycle?)"):format(what, path)) end
  local n = #v
  for k, x in pairs(v) do
    if n > 0 then
      if type(k) ~= "number" or k < 1 or k > n or k ~= math.floor(k) then
        core.raise(("%s: %s mixes list entries with the key %s"):format(what, path, tostring(k)))
      end
      check_json(x, ("%s[%d]"):format(path, k), what, depth + 1)
    else
      if type(k) ~= "string" then
        core.raise(("%s: %s has the key %s; JSON objects have string keys"):format(what, path, tostring(k)))
      end
      check_json(x, path .. "." .. k, what, depth + 1)
    end
  end
end

local function encode_json(v) return require("fsdp.checkpoint.hf").encode_json(v, "", {}, nil) .. "\n" end

local function write_text(path, text, what)
  local f, err = io.open(path, "wb")
  if not f then core.raise(("%s: cannot create '%s': %s"):format(what, path, tostring(err))) end
  local ok, werr = f:write(text)
  f:close()
  if not ok then core.raise(("%s: cannot write '%s': %s"):format(what, path, tostring(werr))) end
  return path
end

local function read_json(path, what)
  local f, err = io.open(path, "rb")
  if not f then core.raise(("%s: cannot read '%s': %s"):format(what, path, tostring(err))) end
  local s = f:read("*a")
  f:close()
  local ok, doc = pcall(cjson.decode, s)
  if not ok or type(doc) ~= "table" then
    core.raise(("%s: '%s' is not valid JSON: %s"):format(what, path, ok and "not an object" or tostring(doc)))
  end
  return doc
end

-- ---- what a model holds ----

local function mode_of(model)
  if model:is_sharded() then return "fsdp" end
  if rawget(model, "ddp") ~= nil then return "ddp" end
  return "plain"
end

-- The model's parameters in full_parameter_list order (every rank the same): {name, loc = the local tensor (an FSDP
-- shard, or the whole tensor), start = its first element in the whole tensor, count, shape (global), numel, row
-- (elements per dim-0 row), dtype}.
local function model_entries(model, what)
  if type(model) ~= "table" or type(model.full_parameter_list) ~= "function" then
    core.raise(("%s: model must be a module, got %s"):format(what, type(model)))
  end
  local list = {}
  for _, e in ipairs(model:full_parameter_list()) do
    local name, full = e[1], e[2]
    local loc = Tensor.local_of(full)
    local info = loc ~= full and Tensor.shard_info(loc) or nil
    local shape = full:shape()
    local numel = full:numel()
    local count = loc:numel()
    if count > 0 and not loc:has_data() then
      core.raise(("%s: parameter '%s' %s has no data (on meta): materialize or shard the model first")
                 :format(what, name, loc:shape_str()))
    end
    if not ELEM[loc.dtype] then
      core.raise(("%s: parameter '%s' is %s, which a checkpoint cannot hold"):format(what, name, loc.dtype))
    end
    local d0 = shape[1] or 1
    list[#list + 1] = {name = name, loc = loc, start = info and info.offset or 0, count = count, shape = shape,
                       numel = numel, row = d0 > 0 and numel / d0 or 1, dtype = loc.dtype}
  end
  return list
end

-- A 1-D view of elements [lo, lo + n) of a contiguous local tensor, detached (no autograd), for reading or writing.
local flat_shape = ffi.new("int64_t[1]")
local function flat_range(t, lo, n, what)
  local d = C.fl_detach(Tensor.ptr(t, what))
  if d == nil then core.raise(what .. ": " .. core.last_error()) end
  flat_shape[0] = C.fl_tensor_numel(d)
  local f = C.fl_view(d, 1, flat_shape)
  C.fl_tensor_release(d)
  if f == nil then core.raise(what .. ": " .. core.last_error()) end
  local v = C.fl_narrow(f, 0, lo, n)
  C.fl_tensor_release(f)
  if v == nil then core.raise(what .. ": " .. core.last_error()) end
  return Tensor.wrap(v)
end

local function group_index(opt)
  local idx = {}
  for gi, g in ipairs(opt.param_groups) do idx[g] = gi end
  return idx
end

-- The optimizer's parameters by model entry: {[entry index] = {id, p, group = gi, st}}; every optimizer parameter
-- must be one of the model's (the checkpoint names state by parameter name).
local function optimizer_entries(opt, entries, what)
  if type(opt) ~= "table" or type(opt.each_param) ~= "function" or type(opt.param_groups) ~= "table" then
    core.raise(("%s: optimizer must be an fsdp.optim optimizer, got %s"):format(what, type(opt)))
  end
  local by_tensor = {}
  for i, e in ipairs(entries) do by_tensor[e.loc] = i end
  local gidx, per = group_index(opt), {}
  opt:each_param(function(id, p, g)
    local i = by_tensor[p]
    if not i then
      core.raise(("%s: optimizer parameter %d %s is not a parameter of the model (its state would have no name)")
                 :format(what, id, p:shape_str()))
    end
    per[i] = {id = id, p = p, group = gidx[g], st = opt.state[id]}
  end)
  return per
end

-- The state of one parameter as a bit mask of STATE_TENSORS and its step; checks what a checkpoint cannot hold.
local function state_mask(name, o, what)
  if not o or not o.st then return 0, 0 end
  local mask = HAS_STATE
  for k, v in pairs(o.st) do
    if k == "step" then
      if type(v) ~= "number" then core.raise(("%s: optimizer state of '%s': step is %s"):format(what, name, type(v))) end
    elseif STATE_BIT[k] and Tensor.is_tensor(v) then
      if v:numel() ~= o.p:numel() or v.dtype ~= o.p.dtype or not v:is_contiguous() then
        core.raise(("%s: optimizer state '%s' of '%s' is %s %s, the parameter %s %s"):format(what, k, name, v.dtype,
                   v:shape_str(), o.p.dtype, o.p:shape_str()))
      end
      mask = mask + STATE_BIT[k]
    else
      core.raise(("%s: optimizer state of '%s' has '%s' (%s), which a checkpoint cannot hold (known: step, %s)")
                 :format(what, name, tostring(k), type(v), table.concat(STATE_TENSORS, ", ")))
    end
  end
  return mask, o.st.step or 0
end

local function state_names(mask)
  local out = {}
  for i, n in ipairs(STATE_TENSORS) do
    if math.floor(mask / 2 ^ (i - 1)) % 2 == 1 then out[#out + 1] = n end
  end
  return out
end

-- What the FSDP plan made (units and their parameters), or the DDP group, for metadata.json.
local function plan_of(model, mode)
  if mode == "fsdp" then
    local g = require("fsdp.parallel.fsdp_module").group(model)
    local name_of = {}
    for _, e in ipairs(model:full_parameter_list()) do name_of[e[2]] = e[1] end
    local units = {}
    for i, u in ipairs(g.units) do
      local names = {}
      for j, e in ipairs(u.params) do names[j] = name_of[e.full] or e.name end
      local info = u.shards[1] and Tensor.shard_info(u.shards[1])
      units[i] = {name = u.name, params = names, shard_size = info and C.fl_comm_size(info.group) or 1}
    end
    local mesh = g.mesh and {names = g.mesh:names(), sizes = g.mesh:shape()} or nil
    return {units = units}, mesh
  elseif mode == "ddp" then
    local d = model.ddp
    return {ddp = {group_size = d.group:size(), bucket_cap_mb = d.bucket_cap_mb}},
           d.mesh and {names = d.mesh:names(), sizes = d.mesh:shape()} or nil
  end
  return {}, nil
end

-- A djb-style hash of the model's names, shapes and dtypes (every rank must save the same model).
local function structure_hash(entries)
  local h = 5381
  local function mix(s) for i = 1, #s do h = (h * 33 + s:byte(i)) % 2147483647 end end
  for _, e in ipairs(entries) do mix(e.name .. "[" .. table.concat(e.shape, "x") .. "]" .. e.dtype) end
  return h
end

-- ---- layout: who holds and who writes what ----

local HEAD = 8   -- entries, hash, optimizer (0/1), dropout counter, step, loader epoch, loader samples, world
local PER = 4    -- per entry: start, count, state mask, state step
local HEAD_LABEL = {[3] = "optimizer (1: given)", [5] = "step", [6] = "loader epoch", [7] = "loader position (samples)",
                    [8] = "world size"}

-- Gathers every rank's ranges and state (two all-gathers; one process: itself) and checks that the ranks agree.
-- Returns {head = {[r] = {...}}, body = {[r] = {...}}}, rank-indexed from 0. Every rank computes the same errors
-- from the same gathered numbers, so all raise together.
local function gather_layout(mine_head, mine_body, world, collective, what)
  local head, body = {}, {}
  if not collective then
    head[0], body[0] = mine_head, mine_body
    return head, body
  end
  local D = dist()
  local h = Tensor.new(mine_head, {dtype = "i64"})
  local all = Tensor.zeros({world * HEAD}, {dtype = "i64"})
  D.all_gather(all, h)
  local v = all:tolist()
  for r = 0, world - 1 do
    head[r] = {unpack(v, r * HEAD + 1, (r + 1) * HEAD)}
    if head[r][1] ~= head[0][1] or head[r][2] ~= head[0][2] then
      core.raise(("%s: rank %d holds another model than rank 0 (%d parameters vs %d, or other names/shapes): every "
                  .. "rank must save the same model"):format(what, r, head[r][1], head[0][1]))
    end
    for _, k in ipairs {3, 5, 6, 7, 8} do
      if head[r][k] ~= head[0][k] then
        core.raise(("%s: rank %d passed another %s than rank 0 (%d vs %d): every rank must save the same run")
                   :format(what, r, HEAD_LABEL[k], head[r][k], head[0][k]))
      end
    end
  end
  local n = #mine_body
  local b = Tensor.new(n > 0 and mine_body or {0}, {dtype = "i64"})
  local allb = Tensor.zeros({world * math.max(n, 1)}, {dtype = "i64"})
  D.all_gather(allb, b)
  local vb = allb:tolist()
  for r = 0, world - 1 do body[r] = {unpack(vb, r * math.max(n, 1) + 1, r * math.max(n, 1) + n)} end
  return head, body
end

-- The pieces of entry i: ranks holding the same range split its rows (fl_shard_rows), in rank order. Returns the
-- pieces sorted by start, the mask and the step of the state, after checking that the ranges tile the tensor and
-- that every holder has the same optimizer state.
local row0_buf, nrows_buf = ffi.new("int64_t[1]"), ffi.new("int64_t[1]")
local function pieces_of(e, i, body, world, what)
  local holders, order = {}, {}
  local mask, step, mask_rank = nil, nil, nil
  for r = 0, world - 1 do
    local b = body[r]
    local start, count, m, s = b[(i - 1) * PER + 1], b[(i - 1) * PER + 2], b[(i - 1) * PER + 3], b[(i - 1) * PER + 4]
    if count > 0 then
      local key = start .. ":" .. count
      if not holders[key] then holders[key] = {start = start, count = count, ranks = {}}; order[#order + 1] = key end
      local hl = holders[key].ranks
      hl[#hl + 1] = r
      if mask == nil then mask, step, mask_rank = m, s, r
      elseif m ~= mask or (m > 0 and s ~= step) then
        core.raise(("%s: parameter '%s': rank %d has optimizer state {%s} at step %d, rank %d {%s} at step %d")
                   :format(what, e.name, mask_rank, table.concat(state_names(mask), ", "), step, r,
                           table.concat(state_names(m), ", "), s))
      end
    end
  end
  table.sort(order, function(a, b) return holders[a].start < holders[b].start end)
  local pieces, at = {}, 0
  for _, key in ipairs(order) do
    local hd = holders[key]
    if hd.start ~= at then
      core.raise(("%s: parameter '%s': the ranks' ranges leave elements [%d, %d) uncovered or overlapping")
                 :format(what, e.name, math.min(at, hd.start), math.max(at, hd.start)))
    end
    local rows = hd.count / e.row
    for j, r in ipairs(hd.ranks) do
      C.fl_shard_rows(rows, #hd.ranks, j - 1, row0_buf, nrows_buf)
      local r0, nr = tonumber(row0_buf[0]), tonumber(nrows_buf[0])
      if nr > 0 then
        pieces[#pieces + 1] = {rank = r, file = file_name(r, world), start = hd.start + r0 * e.row,
                               count = nr * e.row, row0 = hd.start / e.row + r0, rows = nr}
      end
    end
    at = hd.start + hd.count
  end
  if at ~= e.numel then
    core.raise(("%s: parameter '%s': the ranks' ranges cover %d of its %d elements"):format(what, e.name, at, e.numel))
  end
  return pieces, mask or 0, step or 0
end

local function piece_shape(e, p)
  if #e.shape == 0 then return {} end
  local s = {p.rows}
  for k = 2, #e.shape do s[k] = e.shape[k] end
  return s
end

-- A copy of metadata.json's table (metatables kept: they say how an empty table is written), so that an async
-- save writes what the caller passed even if the caller's `extra` or schedule changes before wait().
local function copy_meta(v)
  if type(v) ~= "table" then return v end
  local c = {}
  for k, x in pairs(v) do c[k] = copy_meta(x) end
  return setmetatable(c, getmetatable(v))
end

-- Writes metadata.json into the staging directory, with the rank files' sizes and checksums; returns its path.
local function write_metadata(stage, meta, files, what)
  meta.files = files
  return write_text(stage .. "/" .. M.METADATA, encode_json(meta), what)
end

-- ---- async state ----

-- At most one background save at a time: {writer (fl_async_write *), txn (publish transaction), dir, meta (rank
-- 0's metadata.json before its files), size (of this rank's file), world, collective}.
local pending = nil
local sync_saves = 0   -- counted for the kill test hook only

local function env_number(name)
  local v = os.getenv(name)
  return v and tonumber(v) or nil
end

-- wait(): finishes the async save in flight, if any — joins its writer thread, the ranks agree that every rank's
-- write succeeded, and rank 0 publishes the directory (atomic swap). Collective (every rank calls it, from the
-- main thread, as save and load do first, and the end of the script does through core.at_exit). Returns the
-- directory published, or nil when nothing was in flight. A failed write raises on every rank and leaves the
-- previous checkpoint in place.
function M.wait()
  local p = pending
  if not p then return nil end
  pending = nil
  local crc = ffi.new("uint32_t[1]")
  local ok, err = pcall(function()
    if p.start_error then core.raise(p.start_error) end
    if C.fl_async_write_wait(p.writer) < 0 or C.fl_async_write_crc32c(p.writer, 0, crc) < 0 then
      core.raise(("checkpoint.save (async) to '%s': %s"):format(p.dir, core.last_error()))
    end
  end)
  C.fl_async_write_release(p.writer)
  p.txn:agree(ok, err)
  local files = gather_files(crc[0], p.size, p.world, p.collective)
  p.txn:phase(function(stage) return p.meta and {write_metadata(stage, p.meta, files, "checkpoint.save (async)")} end)
  p.txn:commit()
  return p.dir
end

-- The save in flight: nil, or {dir =, done = the writer has finished, bytes = host bytes staged}.
function M.async_status()
  if not pending then return nil end
  return {dir = pending.dir, done = C.fl_async_write_done(pending.writer), bytes = tonumber(C.fl_async_write_bytes(pending.writer))}
end

-- ---- save ----

local SAVE_OPTS = {model = true, optimizer = true, step = true, loader = true, schedule = true, extra = true, async = true}

local function le_u64(n)
  local b = {}
  for i = 1, 8 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
  return table.concat(b)
end

-- save(dir, {model =, optimizer =, step =, loader =, schedule =, extra =, async = false}): a training checkpoint of
-- `model` (plain, DDP or sharded by any plan, HSDP included) and, when given, the optimizer (AdamW, SGD), the step
-- (an integer), the data loader's position (fsdp.data loader), the LR schedule (an object with state_dict(), such
-- as optim.cosine_schedule, or a JSON-able table) and `extra` (JSON-able values of the caller's). The random
-- streams are always saved: the dropout key counter (fsdp.dropout_keys) and the run's seed (fsdp.dist.seed()),
-- which key every dropout mask. Collective over the world when the job has several ranks: every rank calls it
-- with the same model. The directory is published atomically (publish.lua): a save killed at any point leaves the
-- previous checkpoint intact. async = true copies this rank's pieces into host memory, starts a background writer
-- and returns; the next save, load or wait() (or the end of the script) waits for it and publishes.
function M.save(dir, opts)
  local what = "checkpoint.save"
  opts = core.check_opts(what, opts, SAVE_OPTS, 2)
  if type(dir) ~= "string" or dir == "" then core.raise(what .. ": dir must be a non-empty string") end
  local model = opts.model
  if model == nil then core.raise(what .. ": model is required") end
  local step = opts.step
  if step ~= nil and (type(step) ~= "number" or step < 0 or step ~= math.floor(step) or step >= 2 ^ 53) then
    core.raise(("%s: step must be an integer >= 0, got %s"):format(what, tostring(step)))
  end
  if opts.extra ~= nil then check_json(opts.extra, "extra", what, 0) end
  local sched = opts.schedule
  if sched ~= nil then
    if type(sched) == "table" and type(sched.state_dict) == "function" then sched = sched:state_dict() end
    check_json(sched, "schedule", what, 0)
  end
  local loader = opts.loader
  if loader ~= nil and (type(loader) ~= "table" or type(loader.state) ~= "function") then
    core.raise(("%s: loader must be an fsdp.data loader, got %s"):format(what, type(loader)))
  end
  M.wait()   -- the save before this one publishes first (collective, as this save is)

  local rank, world = world_info()
  local mode = mode_of(model)
  if mode == "plain" and world > 1 then
    core.raise(("%s: a plain model in a job of %d ranks (every rank would hold its own): wrap it with fsdp.ddp or "
                .. "shard it"):format(what, world))
  end
  local collective = world > 1

  -- what this rank holds: local checks first, agreed on, so that no rank waits for one that failed
  local prep
  local ok, err = pcall(function()
    local entries = model_entries(model, what)
    local per = opts.optimizer and optimizer_entries(opts.optimizer, entries, what) or {}
    local lstate = loader and loader:state() or nil
    local mhead = {#entries, structure_hash(entries), opts.optimizer and 1 or 0, keys.counter(), step or -1,
                   lstate and lstate.epoch or -1, lstate and lstate.samples or -1, world}
    local mbody = {}
    for i, e in ipairs(entries) do
      local mask, sstep = state_mask(e.name, per[i], what)
      local b = (i - 1) * PER
      mbody[b + 1], mbody[b + 2], mbody[b + 3], mbody[b + 4] = e.start, e.count, mask, sstep
    end
    prep = {entries = entries, per = per, head = mhead, body = mbody, loader = lstate}
  end)
  agree(ok, err, what, collective)
  local entries, per = prep.entries, prep.per
  local head, body = gather_layout(prep.head, prep.body, world, collective, what)

  -- the pieces (the same on every rank) and this rank's file
  local tensors, mine, ostate = {}, {}, {}
  for i, e in ipairs(entries) do
    local pieces, mask, sstep = pieces_of(e, i, body, world, what)
    tensors["model." .. e.name] = {shape = e.shape, dtype = e.dtype, pieces = pieces}
    local snames = state_names(mask)
    if opts.optimizer and mask > 0 then
      ostate[e.name] = {step = sstep, tensors = snames}
      for _, sn in ipairs(snames) do tensors["optim." .. e.name .. "." .. sn] = {shape = e.shape, dtype = e.dtype, pieces = pieces} end
    end
    for _, p in ipairs(pieces) do
      if p.rank == rank then
        local lo = p.start - e.start
        local shape = piece_shape(e, p)
        mine[#mine + 1] = {name = "model." .. e.name, dtype = e.dtype, shape = shape, src = e.loc, lo = lo, n = p.count}
        for _, sn in ipairs(opts.optimizer and snames or {}) do
          mine[#mine + 1] = {name = "optim." .. e.name .. "." .. sn, dtype = e.dtype, shape = shape,
                             src = per[i].st[sn], lo = lo, n = p.count}
        end
      end
    end
  end

  -- metadata.json (rank 0 writes it; every rank builds it, so that an error in it is every rank's)
  local meta
  ok, err = pcall(function()
    local plan, mesh = plan_of(model, mode)
    local counters = {}
    for r = 0, world - 1 do counters[r + 1] = head[r][4] end
    meta = {format = M.FORMAT, version = M.VERSION, world_size = world, mode = mode, mesh = mesh, plan = plan,
            tensors = tensors, step = step, schedule = sched, loader = prep.loader, extra = opts.extra,
            model = {model_type = type(model.config) == "table" and model.config.model_type or nil,
                     parameters = #entries},
            rng = {seed = dist().seed(), dropout_counter = counters}}
    if opts.optimizer then
      local o = opts.optimizer
      local groups = {}
      for gi, g in ipairs(o.param_groups) do
        local hyper = {}
        for k, v in pairs(g) do if k ~= "params" then hyper[k] = v end end
        check_json(hyper, ("optimizer param group %d"):format(gi), what, 0)
        groups[gi] = {hyper = hyper, params = {}}
      end
      for i, e in ipairs(entries) do
        local pe = per[i]
        if pe then local list = groups[pe.group].params; list[#list + 1] = e.name end
      end
      meta.optimizer = {type = o.what, param_groups = groups, state = ostate}
    end
    if rank == 0 then encode_json(meta) else meta = nil end   -- an error in it is found before any file is written
  end)
  agree(ok, err, what, collective)

  local layout, text, data_start, data_bytes = st.plan(mine, {format = "fsdp-lua"})
  local my_file = file_name(rank, world)
  local kill_at = os.getenv("FSDP_CHECKPOINT_TEST_KILL")
  local kill_rank, kill_nth = (kill_at or ""):match("^(%d+):?(%d*)$")
  if not opts.async then sync_saves = sync_saves + 1 end
  local kill_me = kill_rank and tonumber(kill_rank) == rank and (tonumber(kill_nth) or 1) == sync_saves
  local txn = publish.begin(dir, {what = what, collective = collective, owns = owned})

  if not opts.async then
    -- this rank's file, in order from offset 0 (the layout is contiguous), so its CRC32C is known when written
    local crc = ffi.new("uint32_t[1]")
    txn:phase(function(stage)
      local path = stage .. "/" .. my_file
      st.write_header(path, text)
      local hb = le_u64(#text) .. text
      crc[0] = C.fl_crc32c(0, hb, #hb)
      for _, l in ipairs(layout) do
        local s = l.spec
        if s.n > 0 then
          local v = flat_range(s.src, s.lo, s.n, what)
          local rc = C.fl_st_write_at_crc32c(path, data_start + l.b, core.dtypes[l.dtype], v._p, crc)
          v:free()
          if rc < 0 then core.raise(("%s: tensor '%s': %s"):format(what, l.name, core.last_error())) end
        end
      end
      if kill_me then ffi.C.kill(core.pid(), 9) end   -- test hook: killed midway (see the header)
      return {path}
    end)
    local files = gather_files(crc[0], data_start + data_bytes, world, collective)
    txn:phase(function(stage) return meta and {write_metadata(stage, meta, files, what)} end)
    txn:commit()
    return dir
  end

  -- async: stage every byte of this rank's file now (the tensors may change as soon as save returns), agree, start
  -- the writer (which computes the file's CRC32C as it writes); wait() agrees again, gathers the checksums, writes
  -- metadata.json and publishes
  local writer = C.fl_async_write_new()
  if writer == nil then core.raise(what .. ": " .. core.last_error()) end
  local sok, serr = pcall(function()
    txn:phase(function(stage)
      local path = stage .. "/" .. my_file
      local fi = C.fl_async_write_add_file(writer, path, data_start + data_bytes)
      if fi < 0 then core.raise(what .. ": " .. core.last_error()) end
      local hb = le_u64(#text) .. text
      core.check(C.fl_async_write_put_bytes(writer, fi, 0, hb, #hb), what)
      for _, l in ipairs(layout) do
        local s = l.spec
        if s.n > 0 then
          local v = flat_range(s.src, s.lo, s.n, what)
          local rc = C.fl_async_write_put_tensor(writer, fi, data_start + l.b, core.dtypes[l.dtype], v._p)
          v:free()
          if rc < 0 then core.raise(("%s: tensor '%s': %s"):format(what, l.name, core.last_error())) end
        end
      end
      return {}
    end)
  end)
  if not sok then
    C.fl_async_write_release(writer)
    error(serr, 0)
  end
  pending = {writer = writer, txn = txn, dir = dir, meta = meta and copy_meta(meta), size = data_start + data_bytes, world = world,
             collective = collective}
  if C.fl_async_write_start(writer, env_number("FSDP_CHECKPOINT_TEST_WRITE_DELAY") or 0) < 0 then
    pending.start_error = ("%s (async) to '%s': %s"):format(what, dir, core.last_error())   -- agreed on at wait
  end
  core.at_exit("fsdp.checkpoint", M.wait)
  return dir
end

-- ---- load ----

local LOAD_OPTS = {model = true, optimizer = true, loader = true, schedule = true, verify = true}

local function same_shape(a, b)
  if type(b) ~= "table" or #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

local function shape_str(s) return "[" .. table.concat(s, ", ") .. "]" end

-- Checks metadata.json's record of one tensor and returns its pieces sorted by start, tiling [0, numel).
local function checked_pieces(meta, tname, rec, numel, where)
  if type(rec.pieces) ~= "table" then core.raise(("%s: tensor '%s' has no pieces"):format(where, tname)) end
  local pieces = {}
  for i, p in ipairs(rec.pieces) do
    if type(p) ~= "table" or type(p.rank) ~= "number" or type(p.start) ~= "number" or type(p.count) ~= "number" then
      core.raise(("%s: tensor '%s': piece %d is malformed"):format(where, tname, i))
    end
    if p.rank < 0 or p.rank >= meta.world_size or p.file ~= file_name(p.rank, meta.world_size) then
      core.raise(("%s: tensor '%s': piece %d names rank %s and file %s, not one of the %d ranks' files")
                 :format(where, tname, i, tostring(p.rank), tostring(p.file), meta.world_size))
    end
    pieces[i] = p
  end
  table.sort(pieces, function(a, b) return a.start < b.start end)
  local at = 0
  for _, p in ipairs(pieces) do
    if p.start ~= at or p.count <= 0 then
      core.raise(("%s: tensor '%s': its pieces leave elements [%d, %d) uncovered or overlapping")
                 :format(where, tname, math.min(at, p.start), math.max(at, p.start + math.max(p.count, 0))))
    end
    at = p.start + p.count
  end
  if at ~= numel then
    core.raise(("%s: tensor '%s' of shape %s has %d elements, its pieces cover %d"):format(where, tname,
               shape_str(rec.shape), numel, at))
  end
  return pieces
end

-- Reads elements [start, start + count) of checkpoint tensor `tname` into the 1-D tensor `dst`: for each piece
-- that overlaps, one read of the overlap's contiguous bytes from that piece's rank file.
local function read_range(ctx, tname, rec, pieces, start, count, dst)
  local stop = start + count
  for _, p in ipairs(pieces) do
    local lo, hi = math.max(start, p.start), math.min(stop, p.start + p.count)
    if lo < hi then
      local path = ctx.dir .. "/" .. p.file
      local hdr = ctx.headers[path]
      if not hdr then
        local ok, h = pcall(st.header, path)
        if not ok then
          core.raise(("%s: the file of rank %d, '%s', is missing or damaged (needed for tensor '%s'): %s")
                     :format(ctx.where, p.rank, path, tname, tostring(h)))
        end
        hdr = h
        ctx.headers[path] = hdr
      end
      local e = hdr.tensors[tname]
      if not e then
        core.raise(("%s: '%s' (rank %d) has no tensor '%s', which metadata.json places there"):format(ctx.where,
                   path, p.rank, tname))
      end
      local fdt = st.dtype_from_st[e.dtype]
      if fdt ~= rec.dtype or e.numel ~= p.count then
        core.raise(("%s: '%s' (rank %d): tensor '%s' is %s with %d elements, metadata.json says %s with %d")
                   :format(ctx.where, path, p.rank, tname, e.dtype, e.numel, tostring(rec.dtype), p.count))
      end
      local v = flat_range(dst, lo - start, hi - lo, ctx.where)
      local rc = C.fl_st_read_into(path, e.offset + (lo - p.start) * ELEM[fdt], core.dtypes[fdt], v._p)
      v:free()
      if rc < 0 then core.raise(("%s: tensor '%s': %s"):format(ctx.where, tname, core.last_error())) end
    end
  end
end

local function load_optimizer(ctx, opt, entries, meta)
  local where = ctx.where
  local mo = meta.optimizer
  if type(mo) ~= "table" then core.raise(where .. ": the checkpoint holds no optimizer state (saved without optimizer =)") end
  if mo.type ~= opt.what then
    core.raise(("%s: the checkpoint holds %s state, the optimizer is %s"):format(where, tostring(mo.type), tostring(opt.what)))
  end
  local per = optimizer_entries(opt, entries, where)
  local saved_group = {}   -- name -> saved group index
  for gi, g in ipairs(mo.param_groups or {}) do
    for _, n in ipairs(g.params or {}) do saved_group[n] = gi end
  end
  local mine = {}
  local missing = {}
  for i, e in ipairs(entries) do
    if per[i] then
      mine[e.name] = true
      if not saved_group[e.name] then missing[#missing + 1] = e.name end
    end
  end
  local unexpected = {}
  for n in pairs(saved_group) do if not mine[n] then unexpected[#unexpected + 1] = n end end
  table.sort(unexpected)
  if #missing + #unexpected > 0 then
    local parts = {}
    if #missing > 0 then
      parts[#parts + 1] = ("the optimizer has parameters the checkpoint's did not: %s"):format(table.concat(missing, ", "))
    end
    if #unexpected > 0 then
      parts[#parts + 1] = ("the checkpoint has optimizer parameters this optimizer lacks: %s"):format(table.concat(unexpected, ", "))
    end
    core.raise(("%s: %s"):format(where, table.concat(parts, "; ")))
  end
  -- hyper-parameters: each of this optimizer's groups takes those of the saved group its parameters were in
  local from = {}
  for i, e in ipairs(entries) do
    local pe = per[i]
    if pe then
      local sg = saved_group[e.name]
      if from[pe.group] and from[pe.group].gi ~= sg then
        core.raise(("%s: param group %d holds '%s' (saved in group %d) and '%s' (saved in group %d): regroup the "
                    .. "parameters as they were saved"):format(where, pe.group, from[pe.group].name, from[pe.group].gi,
                    e.name, sg))
      end
      from[pe.group] = from[pe.group] or {gi = sg, name = e.name}
    end
  end
  local state = {}
  for i, e in ipairs(entries) do
    local pe = per[i]
    local ms = pe and mo.state and mo.state[e.name]
    if ms then
      local s = {step = ms.step}
      for _, sn in ipairs(ms.tensors or {}) do
        local tname = "optim." .. e.name .. "." .. sn
        local rec = meta.tensors[tname]
        if not rec then core.raise(("%s: metadata.json lists optimizer state '%s' but no tensor '%s'"):format(where, sn, tname)) end
        if not same_shape(e.shape, rec.shape) then
          core.raise(("%s: tensor '%s' has shape %s in metadata.json, the parameter %s"):format(where, tname,
                     shape_str(rec.shape or {}), shape_str(e.shape)))
        end
        local t = Tensor.zeros(pe.p:shape(), {dtype = pe.p.dtype})
        C.fl_tensor_set_category(t._p, core.mem_categories.optim)
        if e.count > 0 then
          read_range(ctx, tname, rec, checked_pieces(meta, tname, rec, e.numel, where), e.start, e.count, t)
        end
        s[sn] = t
      end
      opt:check_state(s, pe.id, pe.p, where)
      state[pe.id] = s
    end
  end
  for gi, f in pairs(from) do
    local hyper = mo.param_groups[f.gi].hyper or {}
    local g = opt.param_groups[gi]
    for k, v in pairs(hyper) do g[k] = v end
    opt:validate(g, gi)
  end
  opt.state = state
end

-- metadata.json of `dir`, checked to be a training checkpoint this build reads.
local function read_meta(dir, where)
  local meta = read_json(dir .. "/" .. M.METADATA, "checkpoint.load")
  if meta.format ~= M.FORMAT then
    core.raise(("%s: metadata.json is not a training checkpoint (format %s)"):format(where, tostring(meta.format)))
  end
  if meta.version ~= M.VERSION then
    core.raise(("%s: metadata.json has version %s; this build reads version %d"):format(where, tostring(meta.version), M.VERSION))
  end
  if type(meta.world_size) ~= "number" or type(meta.tensors) ~= "table" then
    core.raise(where .. ": metadata.json lacks world_size or tensors")
  end
  return meta
end

-- verify_file(dir, meta, r) -> nil when rank r's file has the size and CRC32C metadata.json lists for it, false
-- when metadata.json lists no checksum for it (a checkpoint saved before they were recorded), or the message
-- naming the file and what differs. Reads the whole file once. checkpoint.load and `fsdp-lua inspect` both call it.
local crc_buf, size_buf = ffi.new("uint32_t[1]"), ffi.new("int64_t[1]")
function M.verify_file(dir, meta, r)
  local W = meta.world_size
  local files = meta.files
  -- files listed by name only (or not at all): saved before checksums; one entry with a checksum means all have one
  if type(files) ~= "table" or type(files[1]) ~= "table" then return false end
  local e = files[r + 1]
  local name = file_name(r, W)
  if type(e) ~= "table" or e.name ~= name or type(e.bytes) ~= "number" or type(e.crc32c) ~= "string"
     or not e.crc32c:match("^%x%x%x%x%x%x%x%x$") then
    return ("metadata.json: files[%d] is not {name = '%s', bytes =, crc32c = 8 hex digits}"):format(r + 1, name)
  end
  local path = dir .. "/" .. name
  if C.fl_file_crc32c(path, crc_buf, size_buf) < 0 then
    return ("the file of rank %d, '%s', is missing or damaged: %s"):format(r, path, core.last_error())
  end
  local size, crc = tonumber(size_buf[0]), ("%08x"):format(crc_buf[0])
  if size ~= e.bytes then
    return ("the file of rank %d, '%s', is %d bytes, metadata.json says %d: truncated or rewritten since it was "
            .. "saved"):format(r, path, size, e.bytes)
  end
  if crc ~= e.crc32c:lower() then
    return ("the file of rank %d, '%s', fails its checksum: CRC32C %s, metadata.json says %s: damaged since it was "
            .. "saved"):format(r, path, crc, e.crc32c:lower())
  end
  return nil
end

-- Verifies this rank's share of the checkpoint's files (rank r: files r, r + world, ...), so that every file is
-- read once by one rank whatever the old and new world sizes.
local function verify_share(dir, meta, rank, world, where)
  for r = rank, meta.world_size - 1, world do
    local bad = M.verify_file(dir, meta, r)
    if bad then core.raise(("%s: %s"):format(where, bad)) end
  end
end

-- Everything load does on this rank, once the files are verified, before the ranks agree.
local function load_local(dir, meta, opts)
  local where = ("checkpoint.load '%s'"):format(dir)
  local model = opts.model
  local entries = model_entries(model, where)
  -- the model must be the saved one: names and shapes (and the architecture, when both know it)
  local missing, mismatched, seen = {}, {}, {}
  for _, e in ipairs(entries) do
    local rec = meta.tensors["model." .. e.name]
    seen["model." .. e.name] = true
    if not rec then missing[#missing + 1] = e.name
    elseif not same_shape(e.shape, rec.shape) then
      mismatched[#mismatched + 1] = ("'%s' is %s in the checkpoint, %s in the model"):format(e.name,
        shape_str(type(rec.shape) == "table" and rec.shape or {}), shape_str(e.shape))
    end
  end
  local unexpected = {}
  for tname in pairs(meta.tensors) do
    if tname:sub(1, 6) == "model." and not seen[tname] then unexpected[#unexpected + 1] = tname:sub(7) end
  end
  table.sort(unexpected)
  if #missing + #unexpected + #mismatched > 0 then
    local parts = {}
    local saved_type = type(meta.model) == "table" and meta.model.model_type or nil
    local my_type = type(model.config) == "table" and model.config.model_type or nil
    if saved_type and my_type and saved_type ~= my_type then
      parts[#parts + 1] = ("holds a %s model, this one is %s"):format(saved_type, my_type)
    end
    if #missing > 0 then parts[#parts + 1] = ("lacks %d parameter(s) of the model: %s"):format(#missing, table.concat(missing, ", ")) end
    if #unexpected > 0 then
      parts[#parts + 1] = ("holds %d parameter(s) the model does not have: %s"):format(#unexpected, table.concat(unexpected, ", "))
    end
    if #mismatched > 0 then parts[#parts + 1] = "has other shapes: " .. table.concat(mismatched, "; ") end
    core.raise(("%s: the checkpoint %s"):format(where, table.concat(parts, "; ")))
  end
  local ctx = {dir = dir, where = where, headers = {}}
  for _, e in ipairs(entries) do
    local tname = "model." .. e.name
    local rec = meta.tensors[tname]
    local pieces = checked_pieces(meta, tname, rec, e.numel, where)
    if e.count > 0 then read_range(ctx, tname, rec, pieces, e.start, e.count, e.loc) end
  end
  if model:is_sharded() then
    -- a unit still holding gathered weights (kept after an eval forward) would compute with the old ones
    for _, u in ipairs(require("fsdp.parallel.fsdp_module").group(model).units) do
      core.check(C.fl_fsdp_reshard(u.ptr), where)
    end
  end
  if opts.optimizer then load_optimizer(ctx, opts.optimizer, entries, meta) end

  -- random streams
  local rng = type(meta.rng) == "table" and meta.rng or {}
  local rank, world = world_info()
  local counters = rng.dropout_counter
  if type(counters) == "table" and #counters > 0 then
    local c = counters[rank + 1]
    if world ~= meta.world_size then
      for r = 2, #counters do
        if counters[r] ~= counters[1] then
          core.raise(("%s: the dropout key counters of the %d saved ranks differ (rank 0: %d, rank %d: %d): cannot "
                      .. "resume them at %d ranks"):format(where, #counters, counters[1], r - 1, counters[r], world))
        end
      end
      c = counters[1]
    end
    keys.set_counter(c)
  end
  local seed = dist().seed()
  -- Checkpoints from when each module seeded its own masks list those seeds (module_seeds); the masks are now
  -- keyed by the run's seed, so such a checkpoint resumes exactly only where every module seed is that seed.
  local old = type(rng.module_seeds) == "table" and rng.module_seeds or {}
  local mask_seed, names = seed or rng.seed or 0, {}
  for key in pairs(old) do names[#names + 1] = key end
  table.sort(names)
  local uniform = true
  for _, key in ipairs(names) do uniform = uniform and old[key] == old[names[1]] end
  for _, key in ipairs(names) do
    if old[key] ~= mask_seed then
      local hint = (uniform and seed == nil and rng.seed == nil)
        and ("; fsdp.init{seed = %s} before loading draws the masks it drew"):format(tostring(old[key])) or ""
      core.raise(("%s: the checkpoint's dropout masks were keyed by module seeds ('%s' = %s), this version keys "
                  .. "them by the run's seed (%d here): resuming would draw other masks%s")
                 :format(where, key, tostring(old[key]), mask_seed, hint))
    end
  end
  if rng.seed ~= nil and seed ~= nil and seed ~= rng.seed then
    core.raise(("%s: this run's seed (fsdp.init{seed = %d}) is not the checkpoint's (%d)"):format(where, seed, rng.seed))
  end

  if opts.loader ~= nil then
    if type(meta.loader) ~= "table" then core.raise(where .. ": the checkpoint holds no loader position (saved without loader =)") end
    local ok, err = pcall(opts.loader.set_state, opts.loader, meta.loader)
    if not ok then core.raise(("%s: loader: %s"):format(where, tostring(err))) end
  end
  if opts.schedule ~= nil then
    if type(opts.schedule) ~= "table" or type(opts.schedule.load_state_dict) ~= "function" then
      core.raise(where .. ": schedule must be an object with load_state_dict (optim.cosine_schedule)")
    end
    if meta.schedule == nil then core.raise(where .. ": the checkpoint holds no schedule (saved without schedule =)") end
    opts.schedule:load_state_dict(meta.schedule)
  end
  return {step = meta.step, extra = meta.extra, schedule = meta.schedule, loader = meta.loader, rng = meta.rng,
          world_size = meta.world_size, mode = meta.mode, plan = meta.plan, mesh = meta.mesh}, rng.seed
end

-- load(dir, {model =, optimizer =, loader =, schedule =, verify = true}) -> {step =, extra =, schedule =, loader =, rng =,
-- world_size =, mode =, ...}: reads a checkpoint saved by save into `model` (already built, sharded or wrapped the
-- way this run wants: any plan, world size or mode) — each rank reads only the element ranges it now holds, from
-- the saved ranks' files — and, when given, the optimizer state (matched by parameter name, hyper-parameters from
-- the saved param groups), the loader's position (in global samples) and the schedule. Restores the random
-- streams: the dropout key counter and the run's seed (fsdp.init{seed =} when the run
-- has none; a different one is an error). Collective over the world when the job has several ranks; an error on
-- any rank (a missing or damaged rank file, a tensor of another shape, another architecture) raises on every rank
-- naming the file, tensor and rank. Every rank file is first checked against the size and CRC32C metadata.json
-- lists (each rank reads a share of them whole), so a damaged file is named before anything is changed;
-- checkpoints saved before checksums were recorded load unverified. verify = false skips that pass: it reads the
-- files once more, about 0.1 s per 500 MB in the page cache, which doubles a load from the page cache (measured:
-- 0.19 s against 0.09 s for a 500 MB file); from disk it is the read that the load then finds cached.
function M.load(dir, opts)
  local what = "checkpoint.load"
  opts = core.check_opts(what, opts, LOAD_OPTS, 2)
  if type(dir) ~= "string" or dir == "" then core.raise(what .. ": dir must be a non-empty string") end
  if opts.model == nil then core.raise(what .. ": model is required") end
  if opts.verify ~= nil and type(opts.verify) ~= "boolean" then
    core.raise(("%s: verify must be a boolean, got %s"):format(what, type(opts.verify)))
  end
  M.wait()
  local rank, world = world_info()
  local collective = world > 1
  -- every file verified and agreed on before anything is read into the model or the optimizer
  local where = ("%s '%s'"):format(what, dir)
  local ok, meta = pcall(function()
    local m = read_meta(dir, where)
    if opts.verify ~= false then verify_share(dir, m, rank, world, where) end
    return m
  end)
  agree(ok, meta, what, collective)
  local res, seed
  ok, res, seed = pcall(load_local, dir, meta, opts)
  agree(ok, res, what, collective)
  if seed ~= nil and dist().seed() == nil then dist().init{seed = seed} end   -- collective: every rank is here
  return res
end

return M
