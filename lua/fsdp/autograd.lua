-- lua/fsdp/autograd.lua: the Lua side of autograd — backward (the one place Lua calls fl_backward),
-- activation checkpointing through the engine's custom nodes, grad-mode re-exports and leak counters.
-- The graph, the backward engine and the saved tensors are C (engine/core/autograd.c).
--
-- LuaJIT rule this file is built around: a C function that calls back into Lua must never be called from a
-- JIT-compiled trace. fl_backward calls back into Lua when the graph holds a checkpoint node, so every Lua
-- function that calls fl_backward is jit.off'd, and there is exactly one long-lived callback (callbacks are
-- a scarce resource in LuaJIT), which dispatches by node id to the pending recomputations below.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local keys   = require "fsdp.dropout_keys"

local C, own, ptr, is_tensor, wrap = core.C, Tensor.own, Tensor.ptr, Tensor.is_tensor, Tensor.wrap
local M = {}

local FL_ESTATE = -4   -- enum fl_status (constants are not visible through the FFI as Lua values)
local FLOAT = {f32 = true, f64 = true, bf16 = true, f16 = true}

-- Checkpoint nodes still waiting for their backward: id -> {fn, args, nargs, tin, rg, outpos, keys}; keys is the
-- dropout call counter when fn first ran.
local pending, next_id = {}, 1
-- True while a backward that keeps the graph (retain_graph) runs: its checkpoint entries must survive.
local retaining = false
-- The message of a failure inside the callback: the engine only learns "negative", Lua raises this text.
local callback_error = nil

local function pack(...) return {n = select("#", ...), ...} end

-- Raises after a failed fl_backward, preferring the callback's own message (the engine prefixes the
-- node name to its buffer, which does not hold a Lua error's text).
local function raise_backward(level)
  local msg = callback_error or core.last_error()
  callback_error = nil
  error(msg, level + 1)
end

-- backward(t [, grad] [, {retain_graph = bool}]): gradients of t into the .grad of the leaves below it.
function M.backward(t, grad, opts)
  if type(grad) == "table" and not is_tensor(grad) then opts, grad = grad, nil end
  opts = core.check_opts("backward", opts, {retain_graph = true}, 2)
  local keep = opts.retain_graph and true or false
  local was = retaining
  retaining = keep
  callback_error = nil
  local rc = C.fl_backward(ptr(t, "backward"), grad and ptr(grad, "backward", 2) or nil, keep)
  retaining = was
  if rc < 0 then raise_backward(2) end
end
jit.off(M.backward, true)

-- Runs the pending recomputation of node `id`: fn again, with grad on, on detached copies of its inputs,
-- then one nested backward from its outputs with the incoming gradients; the copies' grads go back to C.
local function recompute(id, n_out, grad_out, n_in, grad_in)
  id = tonumber(id)           -- int64_t arrives as a boxed cdata, which is no table key
  local e = pending[id]
  if not e then
    error(("node %d has no pending recomputation (it already ran; pass retain_graph = true to "
           .. "fsdp.autograd.backward to run it twice)"):format(id), 0)
  end
  if not retaining then pending[id] = nil end
  local args, copies = {}, {}
  for i = 1, e.nargs do args[i] = e.args[i] end
  for k, i in ipairs(e.tin) do       -- tin[k] = argument position of node input k (0-based k-1)
    local src = e.args[i]
    local d = own(C.fl_detach(src._p), "checkpoint")
    if e.rg[k] then d.requires_grad = true end
    args[i], copies[k] = d, d
  end
  keys.set_counter(e.keys)   -- the dropouts in fn draw the forward's masks again (on_backward restores the counter)
  local outs = pack(e.fn(unpack(args, 1, e.nargs)))
  -- The outputs that have an incoming gradient and a graph: those are the roots of the nested backward.
  local roots, grads = {}, {}
  for j = 0, n_out - 1 do
    local o = outs[e.outpos[j + 1]]
    if grad_out[j] ~= nil and is_tensor(o) and o.requires_grad then
      roots[#roots + 1], grads[#grads + 1] = o, grad_out[j]
    end
  end
  local was = retaining
  callback_error = nil
  retaining = false          -- checkpoints nested in fn belong to this fresh graph: free them as they run
  local rc = 0
  if #roots == 1 then
    rc = C.fl_backward(roots[1]._p, grads[1], false)
  elseif #roots > 1 then
    -- One backward over sum_j <out_j, g_j>: its gradient at out_j is exactly g_j (the sum gives ones, the
    -- product ones * g_j), and one pass accumulates shared parameters the way the plain graph would.
    local total
    for j = 1, #roots do
      local g = wrap(C.fl_detach(grads[j]))
      local s = own(C.fl_sum(own(C.fl_mul(roots[j]._p, g._p), "checkpoint")._p), "checkpoint")
      total = total and own(C.fl_add(total._p, s._p), "checkpoint") or s
    end
    rc = C.fl_backward(total._p, nil, false)
  end
  retaining = was
  if rc < 0 then error(callback_error or core.last_error(), 0) end
  for k = 1, n_in do
    local d = copies[k]
    grad_in[k - 1] = (d and e.rg[k]) and C.fl_tensor_get_grad(d._p) or nil  -- owned refs, taken by C
  end
  return 0
end

local function on_backward(id, n_out, grad_out, n_in, grad_in)
  local was, calls = C.fl_grad_is_enabled(), keys.counter()
  C.fl_grad_set_enabled(true)
  local ok, err = pcall(recompute, id, n_out, grad_out, n_in, grad_in)
  C.fl_grad_set_enabled(was)
  keys.set_counter(calls)   -- a recompute replays old keys; later forwards continue where they left off
  if ok then return 0 end
  -- An error must not unwind through the C engine: record it and let fl_backward return it.
  for k = 0, n_in - 1 do
    if grad_in[k] ~= nil then C.fl_tensor_release(grad_in[k]); grad_in[k] = nil end
  end
  if not callback_error then callback_error = "checkpoint: " .. tostring(err) end
  return FL_ESTATE
end
jit.off(on_backward, true)
jit.off(recompute, true)
local callback = ffi.cast("fl_custom_backward_fn", on_backward)  -- lives as long as the module

-- A leaf that requires grad, given to a checkpoint node whose inputs need none, so that the node is still
-- recorded and the parameters used inside fn get their gradients. It never receives a gradient itself.
local anchor = nil
local ins_n, ins_buf = 0, nil
local outs_n, outs_buf = 0, nil

-- checkpoint(fn, ...): fn(...) without keeping its intermediate tensors; backward runs fn again.
-- fn must be deterministic in its tensor arguments; its dropouts are made so by replaying the dropout key counter
-- (fsdp.dropout_keys) from where it stood when fn first ran. Its
-- floating-point tensor results come back detached and attached to one node; other results pass through.
-- Tensors fn reaches other than through its arguments (parameters) get their .grad in the nested backward.
function M.checkpoint(fn, ...)
  if type(fn) ~= "function" and not (getmetatable(fn) and getmetatable(fn).__call) then
    error(("checkpoint: argument 1 must be a function, got %s"):format(type(fn)), 2)
  end
  if not C.fl_grad_is_enabled() then return fn(...) end
  local nargs = select("#", ...)
  local args = {...}
  local e = {fn = fn, args = {}, nargs = nargs, tin = {}, rg = {}, outpos = {}, keys = keys.counter()}
  local any = false
  for i = 1, nargs do
    local a = args[i]
    if is_tensor(a) then
      -- Keep a detached view: the node's edges already hold the producers, a grad_fn here would pin them twice.
      e.args[i] = own(C.fl_detach(ptr(a, "checkpoint", i + 1)), "checkpoint")
      e.tin[#e.tin + 1] = i
      e.rg[#e.tin] = a.requires_grad
      any = any or a.requires_grad
    else
      e.args[i] = a
    end
  end
  local outs = pack(require("fsdp").no_grad(fn, ...))
  local attached = {}
  for j = 1, outs.n do
    local o = outs[j]
    if is_tensor(o) and FLOAT[o.dtype] then
      outs[j] = own(C.fl_detach(o._p), "checkpoint")
      e.outpos[#e.outpos + 1] = j
      attached[#attached + 1] = outs[j]
    end
  end
  if #attached == 0 then return unpack(outs, 1, outs.n) end
  local n_in = #e.tin + (any and 0 or 1)
  if ins_n < n_in then ins_n = n_in * 2; ins_buf = ffi.new("fl_tensor *[?]", ins_n) end
  for k, i in ipairs(e.tin) do ins_buf[k - 1] = ptr(args[i], "checkpoint") end
  if not any then
    if not anchor then anchor = Tensor.zeros({}); anchor.requires_grad = true end
    ins_buf[n_in - 1] = anchor._p
  end
  if outs_n < #attached then outs_n = #attached * 2; outs_buf = ffi.new("fl_tensor *[?]", outs_n) end
  for j = 1, #attached do outs_buf[j - 1] = attached[j]._p end
  local id = next_id
  next_id = next_id + 1
  local rc = C.fl_custom_node("checkpoint", id, callback, n_in, ins_buf, #attached, outs_buf)
  if rc < 0 then core.fail("checkpoint", 1) end
  if rc == 1 then pending[id] = e end
  return unpack(outs, 1, outs.n)
end

-- Checkpoint nodes recorded and not yet run (their inputs are kept alive until then).
function M.pending_checkpoints()
  local n = 0
  for _ in pairs(pending) do n = n + 1 end
  return n
end

-- Grad mode scopes, the same functions as fsdp.no_grad / fsdp.enable_grad (required lazily: fsdp.ops
-- may load this module while fsdp itself is still loading).
function M.no_grad(fn, ...) return require("fsdp").no_grad(fn, ...) end
function M.enable_grad(fn, ...) return require("fsdp").enable_grad(fn, ...) end
function M.is_grad_enabled() return C.fl_grad_is_enabled() end

-- Nodes alive in the engine now: a graph that was freed brings this back to where it started.
function M.live_nodes() return tonumber(C.fl_autograd_live_nodes()) end

return M
