-- lua/fsdp/tensor.lua: the Tensor class, a Lua handle on an engine fl_tensor. Arithmetic operators, shape
-- methods and element access live here, printing in tensor_str.lua; the neural-network ops are in fsdp.ops, which
-- adds methods to this class.
local ffi  = require "ffi"
local core = require "fsdp.core"

local C = core.C
local dtype_names, device_names = core.dtype_names, core.device_names

local Tensor = {}
local methods = {}
Tensor.methods = methods

local shape_buf = ffi.new("int64_t[8]")

-- The engine's allocation counter drives the collector: a dead Lua handle can pin megabytes that Lua's GC
-- does not see, so once the engine has allocated a quarter of what it holds now (at least 4 MB) since the
-- last collection, we run a full one. Memory then stays within ~25% of the live set, whatever the model size.
local GC_MIN_BUDGET = 4 * 1024 * 1024
local release = C.fl_tensor_release

local function wrap(p)
  local pending = C.fl_alloc_bytes_pending()
  if pending > GC_MIN_BUDGET and pending > C.fl_mem_total_current() / 4 then
    C.fl_alloc_reset_pending()
    collectgarbage("collect")
  end
  return setmetatable({_p = ffi.gc(p, release)}, Tensor)
end
Tensor.wrap = wrap

-- Wraps an owned pointer, raising the engine's error when it is NULL. The engine's message names the op
-- already; callers pass its Lua name as well, so that the call site reads as what it wraps.
local function own(p, _what)
  if p == nil then core.raise(core.last_error()) end  -- engine messages name the op already
  return wrap(p)
end
Tensor.own = own

local function is_tensor(x) return getmetatable(x) == Tensor end
Tensor.is_tensor = is_tensor

-- Every op's entry: also where a Ctrl-C in the REPL (engine/core/interrupt.c) stops a loop of ops, compiled
-- loops included, which LuaJIT's debug hook never sees. Before the op, never inside it.
local take_interrupt = C.fl_interrupt_take
local function ptr(t, what, argn)
  if take_interrupt() then core.raise(("interrupted (in %s)"):format(what)) end
  if getmetatable(t) ~= Tensor then
    core.raise(("%s: argument %d must be a tensor, got %s"):format(what, argn or 1, type(t)))
  end
  local p = t._p
  if p == nil then core.raise(what .. ": tensor was freed") end
  return p
end
Tensor.ptr = ptr

local function fill_shape(shape, what)
  if type(shape) ~= "table" then core.raise(("%s: shape must be a table of sizes, got %s"):format(what, type(shape))) end
  local n = #shape
  if n > 8 then core.raise(("%s: %d dims (at most 8)"):format(what, n)) end
  for i = 1, n do
    local s = shape[i]
    if type(s) ~= "number" or s ~= math.floor(s) then
      core.raise(("%s: size %d is %s, expected an integer"):format(what, i, tostring(s)))
    end
    if s >= 2 ^ 63 or s < -2 ^ 63 then   -- beyond int64: the FFI conversion would be undefined
      core.raise(("%s: size %d is %s, more than an int64 holds"):format(what, i, tostring(s)))
    end
    shape_buf[i - 1] = s
  end
  return n, shape_buf
end
Tensor.fill_shape = fill_shape

-- A sharded parameter knows where it lives: FSDP marks each local shard with the fl_comm it is sharded over and
-- its place in the whole parameter ({group =, offset = first element, numel = whole parameter's elements}), so
-- that reductions over parameters (the gradient norm) sum shards over that group and nothing else, and the
-- optimizer rounds each element as it would in the whole tensor. nil for plain and DDP parameters, whose every
-- rank holds the whole tensor.
function Tensor.set_shard_info(t, info) rawset(t, "_shard_info", info) end
-- A distributed parameter's local part (DTensor.to_local): the module keeps the full-shape tensor, whose data
-- may come and go (FSDP unshards it for compute); optimizers, clipping and state see its local part.
function Tensor.set_local(t, part) rawset(t, "_local", part) end
function Tensor.local_of(t) return rawget(t, "_local") or t end
function Tensor.shard_info(t) return rawget(t, "_shard_info") end
-- A DDP parameter is replicated over a group (the fl_comm): every rank holds the same gradient after the
-- all-reduce, so a reduction over parameters may split its work across the replicas.
function Tensor.set_replica_group(t, comm) rawset(t, "_replica_group", comm) end
function Tensor.replica_group(t) return rawget(t, "_replica_group") end
function Tensor.shard_group(t)
  local info = rawget(t, "_shard_info")
  return info and info.group
end

-- ---- properties (t.dtype, t.device, t.grad, t.requires_grad, t.grad_fn) ----
local props = {
  dtype = function(t) return dtype_names[t._p.dtype] end,
  device = function(t) return device_names[t._p.device] end,
  requires_grad = function(t) return t._p.requires_grad ~= 0 end,
  grad = function(t)
    local g = C.fl_tensor_get_grad(t._p)
    if g == nil then return nil end
    return wrap(g)
  end,
  grad_fn = function(t)
    local s = C.fl_tensor_grad_fn_name(t._p)
    return s ~= nil and ffi.string(s) or nil
  end,
  ndim = function(t) return t._p.ndim end,
}

Tensor.__index = function(t, k)
  local m = methods[k]
  if m then return m end
  local p = props[k]
  if p then
    if rawget(t, "_p") == nil then error("tensor was freed", 2) end
    return p(t)
  end
  return nil
end

-- The REPL's TAB completion (lua/fsdp/repl.lua) cannot list a function __index: these are its names.
function Tensor.__completions()
  local names = {}
  for k in pairs(methods) do names[#names + 1] = k end
  for k in pairs(props) do names[#names + 1] = k end
  return names
end

Tensor.__newindex = function(t, k, v)
  if k == "requires_grad" then
    core.check(C.fl_tensor_set_requires_grad(ptr(t, "requires_grad"), v and true or false), nil, 2)
  elseif k == "grad" then
    core.check(C.fl_tensor_set_grad(ptr(t, "grad"), v and ptr(v, "grad") or nil), nil, 2)
  else
    error(("tensor: cannot set field '%s'"):format(tostring(k)), 2)
  end
end

-- ---- constructors ----
local function parse_opts(what, opts)
  opts = core.check_opts(what, opts, {dtype = true, device = true, requires_grad = true, seed = true, name = true,
                                      std = true, mean = true}, 3)
  return core.dtype_id(opts.dtype or "f32", what), core.device_id(opts.device or "cpu", what), opts
end

local function finish(t, opts)
  if opts.requires_grad then t.requires_grad = true end
  return t
end

function Tensor.empty(shape, opts)
  local dt, dev, o = parse_opts("empty", opts)
  local n, sb = fill_shape(shape, "empty")
  return finish(own(C.fl_tensor_empty(n, sb, dt, dev), "empty"), o)
end

function Tensor.zeros(shape, opts)
  local dt, dev, o = parse_opts("zeros", opts)
  local n, sb = fill_shape(shape, "zeros")
  return finish(own(C.fl_tensor_zeros(n, sb, dt, dev), "zeros"), o)
end

function Tensor.full(shape, value, opts)
  local dt, dev, o = parse_opts("full", opts)
  local n, sb = fill_shape(shape, "full")
  local t
  if dev == 1 then t = own(C.fl_tensor_empty(n, sb, dt, dev), "full")
  else t = own(C.fl_tensor_full(n, sb, dt, value), "full") end
  return finish(t, o)
end

function Tensor.ones(shape, opts) return Tensor.full(shape, 1, opts) end

-- randn/rand use the counter-based RNG: the values depend on (seed, name, index) only.
function Tensor.randn(shape, opts)
  local dt, dev, o = parse_opts("randn", opts)
  local n, sb = fill_shape(shape, "randn")
  local t = own(C.fl_tensor_empty(n, sb, dt, dev), "randn")
  core.check(C.fl_tensor_normal_(t._p, o.seed or 0, o.name or "randn", 0, o.mean or 0, o.std or 1), "randn", 2)
  return finish(t, o)
end

function Tensor.rand(shape, opts)
  local dt, dev, o = parse_opts("rand", opts)
  local n, sb = fill_shape(shape, "rand")
  local t = own(C.fl_tensor_empty(n, sb, dt, dev), "rand")
  core.check(C.fl_tensor_uniform_(t._p, o.seed or 0, o.name or "rand", 0, 0, 1), "rand", 2)
  return finish(t, o)
end

function Tensor.arange(a, b, opts)
  if b == nil or type(b) == "table" then a, b, opts = 0, a, b end
  local dt = parse_opts("arange", opts)
  return own(C.fl_tensor_arange(a, b, dt), "arange")
end

-- fsdp.tensor(number | nested table, {dtype=}): nested tables give the shape by nesting.
function Tensor.new(data, opts)
  local dt, _, o = parse_opts("tensor", opts)
  if type(data) == "number" or type(data) == "boolean" then
    local t = own(C.fl_tensor_full(0, shape_buf, dt, type(data) == "boolean" and (data and 1 or 0) or data), "tensor")
    return finish(t, o)
  end
  if type(data) ~= "table" then error(("tensor: expected a number or a table, got %s"):format(type(data)), 2) end
  local shape, x = {}, data
  while type(x) == "table" do
    shape[#shape + 1] = #x
    x = x[1]
    if #shape > 8 then error("tensor: more than 8 levels of nesting", 2) end
  end
  local flat = {}
  local function walk(v, d, where)
    if d > #shape then
      if type(v) ~= "number" then core.raise(("tensor: element %s is %s, expected a number"):format(where, type(v))) end
      flat[#flat + 1] = v
      return
    end
    if type(v) ~= "table" or #v ~= shape[d] then
      core.raise(("tensor: ragged nesting at %s (expected %d elements)"):format(where, shape[d]))
    end
    for i = 1, #v do walk(v[i], d + 1, where .. "[" .. i .. "]") end
  end
  walk(data, 1, "")
  local n, sb = fill_shape(shape, "tensor")
  local t = own(C.fl_tensor_empty(n, sb, dt, 0), "tensor")
  local p = t._p
  for i = 1, #flat do C.fl_tensor_set_flat(p, i - 1, flat[i]) end
  return finish(t, o)
end

-- ---- reading ----
function methods.shape(t)
  local p = ptr(t, "shape")
  local s = {}
  for i = 0, p.ndim - 1 do s[i + 1] = tonumber(p.shape[i]) end
  return s
end

function methods.size(t, d)
  local p = ptr(t, "size")
  if d == nil then return t:shape() end
  local nd = p.ndim
  local i = d < 0 and nd + d or d - 1
  if i < 0 or i >= nd then error(("size: dim %d out of range for a %d-d tensor"):format(d, nd), 2) end
  return tonumber(p.shape[i])
end

function methods.dim(t) return ptr(t, "dim").ndim end
function methods.numel(t) return tonumber(C.fl_tensor_numel(ptr(t, "numel"))) end
function methods.is_contiguous(t) return C.fl_tensor_is_contiguous(ptr(t, "is_contiguous")) end
function methods.has_data(t) return C.fl_tensor_has_data(ptr(t, "has_data")) end

function methods.shape_str(t)
  return "[" .. table.concat(t:shape(), ", ") .. "]"
end

-- A tensor without bytes here: on meta, a sharded parameter between gathers (its local part holds this rank's
-- rows), or released storage.
local function check_data(what, t, p)
  if C.fl_tensor_has_data(p) then return end
  if p.device == C.FL_META then core.raise(("%s: tensor %s is on meta (materialise it first)"):format(what, t:shape_str())) end
  if rawget(t, "_local") then
    core.raise(("%s: parameter %s is sharded now (not gathered); read this rank's rows from fsdp.Tensor.local_of(p)")
               :format(what, t:shape_str()))
  end
  core.raise(("%s: tensor %s has released storage"):format(what, t:shape_str()))
end

function methods.item(t)
  local p = ptr(t, "item")
  if C.fl_tensor_numel(p) ~= 1 then
    error(("item: tensor %s has %d elements, expected 1"):format(t:shape_str(), t:numel()), 2)
  end
  check_data("item", t, p)
  return tonumber(C.fl_tensor_get_flat(p, 0))
end

-- Element access. t:get(i) reads element i of the row-major order (any number of dims); t:get(i1, ..., iN) on an
-- N-d tensor reads element [i1]...[iN]. Indices are 0-based, as get/set have always been and as the ids the
-- engine takes and returns (topk, gather, embedding); dims, in messages, are 1-based like size(d). Both forms read
-- through the view's strides, so a transposed or narrowed view reads its own elements.
local function describe(v) return type(v) == "number" and tostring(v) or type(v) end

-- The flat row-major index that the n indices (...) address, or an error naming the index, dim and size.
local function flat_index(what, t, p, n, ...)
  local nd = p.ndim
  if n == 1 then
    local i = ...
    local numel = tonumber(C.fl_tensor_numel(p))
    if type(i) ~= "number" or i ~= math.floor(i) then
      core.raise(("%s: index must be an integer, got %s"):format(what, describe(i)))
    end
    if i < 0 or i >= numel then
      core.raise(("%s: index %s out of range for %s (%d elements; indices are 0-based)")
                 :format(what, tostring(i), t:shape_str(), numel))
    end
    return i
  end
  if n ~= nd then
    core.raise(("%s: %d indices for the %d-d tensor %s (give %d, or 1 flat index)")
               :format(what, n, nd, t:shape_str(), nd))
  end
  local flat = 0
  for d = 1, nd do
    local i = select(d, ...)
    local size = tonumber(p.shape[d - 1])
    if type(i) ~= "number" or i ~= math.floor(i) then
      core.raise(("%s: index %d (dim %d of %s) must be an integer, got %s"):format(what, d, d, t:shape_str(), describe(i)))
    end
    if i < 0 or i >= size then
      core.raise(("%s: index %s out of range for dim %d of %s (size %d; indices are 0-based)")
                 :format(what, tostring(i), d, t:shape_str(), size))
    end
    flat = flat * size + i
  end
  return flat
end

-- The values a Lua number may write into each dtype: as torch's checked conversion of a Python scalar, a finite value
-- past the dtype's range is an error (for integers the C conversion would be undefined as well); infinities and
-- NaN are fine for floats only. {lowest, highest, how the message prints the range}.
local STORE_RANGE = {
  i32 = {-2 ^ 31, 2 ^ 31 - 1, "[-2^31, 2^31 - 1]"},
  i64 = {-2 ^ 63, 2 ^ 63 - 1, "[-2^63, 2^63 - 1]"},   -- 2^63 - 1 rounds to 2^63 in a double: see the >= below
  u8 = {0, 255, "[0, 255]"},
  f16 = {-65504, 65504, "[-65504, 65504]"},
  bf16 = {-3.3895313892515355e38, 3.3895313892515355e38, "[-3.3895e+38, 3.3895e+38]"},
  f32 = {-3.4028234663852886e38, 3.4028234663852886e38, "[-3.4028e+38, 3.4028e+38]"},
}
local INTEGER_DTYPE = {i32 = true, i64 = true, u8 = true}

local function check_value(what, t, v)
  if type(v) == "boolean" then return v and 1 or 0 end
  if type(v) ~= "number" then core.raise(("%s: value must be a number or a boolean, got %s"):format(what, type(v))) end
  local dt = t.dtype
  local finite = v == v and v > -math.huge and v < math.huge
  if INTEGER_DTYPE[dt] then
    if not finite then core.raise(("%s: value %s cannot be stored in a %s tensor"):format(what, tostring(v), dt)) end
    v = v < 0 and math.ceil(v) or math.floor(v)   -- toward zero, as torch (2.7 -> 2)
  end
  local r = STORE_RANGE[dt]
  if r and finite and (v < r[1] or v > r[2] or (dt == "i64" and v >= 2 ^ 63)) then
    core.raise(("%s: value %s does not fit dtype %s (range %s)"):format(what, tostring(v), dt, r[3]))
  end
  return v
end

-- t:get(i) or t:get(i1, ..., iN) -> the element as a Lua number (i64 beyond 2^53 rounds, as any Lua number).
function methods.get(t, ...)
  local p = ptr(t, "get")
  local i = flat_index("get", t, p, select("#", ...), ...)
  check_data("get", t, p)
  return tonumber(C.fl_tensor_get_flat(p, i))
end

-- t:set(i, v) or t:set(i1, ..., iN, v): writes v (a number or boolean) into that element, converted to t's dtype.
function methods.set(t, ...)
  local p = ptr(t, "set")
  local n = select("#", ...)
  if n < 2 then core.raise(("set: expected indices and a value, got %d argument%s"):format(n, n == 1 and "" or "s")) end
  local v = check_value("set", t, (select(n, ...)))
  local i = flat_index("set", t, p, n - 1, ...)
  check_data("set", t, p)
  core.check(C.fl_tensor_set_flat(p, i, v), nil, 2)
end

function methods.tolist(t)
  local p = ptr(t, "tolist")
  check_data("tolist", t, p)
  local shape, k = t:shape(), 0
  local function build(d)
    if d > #shape then
      local v = tonumber(C.fl_tensor_get_flat(p, k)); k = k + 1; return v
    end
    local r = {}
    for i = 1, shape[d] do r[i] = build(d + 1) end
    return r
  end
  if #shape == 0 then return tonumber(C.fl_tensor_get_flat(p, 0)) end
  return build(1)
end

-- A flat Lua array of all values (row-major).
function methods.totable(t)
  local p = ptr(t, "totable")
  check_data("totable", t, p)   -- get_flat reads NaN without data: a table of NaNs would pass for values
  local n = tonumber(C.fl_tensor_numel(p))
  local r = {}
  for i = 0, n - 1 do r[i + 1] = tonumber(C.fl_tensor_get_flat(p, i)) end
  return r
end

-- Raw pointer to element 0 (contiguous tensors only), for bulk access from Lua.
function methods.data_ptr(t, ctype)
  local p = ptr(t, "data_ptr")
  local d = C.fl_tensor_data(p)
  if d == nil then error("data_ptr: tensor has no data (meta or released)", 2) end
  return ffi.cast(ctype or "void *", d)
end

-- Releases the engine memory now instead of waiting for the collector.
function methods.free(t)
  local p = rawget(t, "_p")
  if p ~= nil then
    ffi.gc(p, nil)
    release(p)
    rawset(t, "_p", nil)
  end
end

-- ---- printing (lua/fsdp/tensor_str.lua: PyTorch's rules, plus shape, dtype, device and sharding) ----
local tensor_str = require "fsdp.tensor_str"
Tensor.__tostring = function(t) return tensor_str.format(t) end
-- t:format{info = false} gives the values alone, as PyTorch prints them.
function methods.format(t, opts) return tensor_str.format(t, opts) end
Tensor.set_printoptions, Tensor.get_printoptions = tensor_str.set_printoptions, tensor_str.get_printoptions

return Tensor
