-- lua/fsdp/ops/basic.lua: elementwise math, reductions, shape ops, matmul and linear, as functions
-- (fsdp.F.add) and as Tensor methods and operators (a + b, a:sum()). Each checks in Lua what Lua can
-- check, calls the engine, and raises its message at the caller's line.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"

local C, own, ptr, is_tensor = core.C, Tensor.own, Tensor.ptr, Tensor.is_tensor
local methods = Tensor.methods
local M = {}

local shape_buf = ffi.new("int64_t[8]")
local dims_buf = ffi.new("int32_t[8]")
local ptrs_buf_n, ptrs_buf = 0, nil

-- Promotes a Lua number to a 0-d tensor of `like`'s dtype so that a + 1 and 2 * a work.
local function as_tensor(x, like, what, argn)
  if is_tensor(x) then return ptr(x, what, argn), x end
  if type(x) == "number" then
    local t = own(C.fl_tensor_full(0, shape_buf, like._p.dtype, x), what)
    return t._p, t
  end
  core.raise(("%s: argument %d must be a tensor or a number, got %s"):format(what, argn, type(x)))
end

local function binary(cname, what)
  local f = C[cname]
  return function(a, b)
    if not is_tensor(a) then   -- number op tensor
      local pa, ta = as_tensor(a, b, what, 1)
      local pb = ptr(b, what, 2)
      local r = own(f(pa, pb), what)
      local _ = ta
      return r
    end
    local pa = ptr(a, what, 1)
    local pb, tb = as_tensor(b, a, what, 2)
    local r = own(f(pa, pb), what)
    local _ = tb   -- keep the temporary alive across the call
    return r
  end
end

M.add = binary("fl_add", "add")
M.sub = binary("fl_sub", "sub")
M.mul = binary("fl_mul", "mul")
M.div = binary("fl_div", "div")

function M.add_scaled(a, b, alpha) return own(C.fl_add_scaled(ptr(a, "add_scaled", 1), ptr(b, "add_scaled", 2), alpha), "add_scaled") end
function M.scale(a, s) return own(C.fl_scale(ptr(a, "scale"), s), "scale") end
function M.add_scalar(a, s) return own(C.fl_add_scalar(ptr(a, "add_scalar"), s), "add_scalar") end
function M.pow(a, p)
  if type(p) ~= "number" then error("pow: exponent must be a number", 2) end
  return own(C.fl_pow_scalar(ptr(a, "pow"), p), "pow")
end

for _, name in ipairs {"neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu"} do
  local f = C["fl_" .. name]
  M[name] = function(a) return own(f(ptr(a, name)), name) end
end

-- In place, outside autograd: a += alpha * b.
function M.add_(a, b, alpha)
  core.check(C.fl_add_(ptr(a, "add_", 1), ptr(b, "add_", 2), alpha or 1), "add_", 2)
  return a
end

function M.fill_(a, v) core.check(C.fl_tensor_fill_(ptr(a, "fill_"), v), nil, 2); return a end
function M.copy_(a, b) core.check(C.fl_tensor_copy_(ptr(a, "copy_", 1), ptr(b, "copy_", 2)), nil, 2); return a end
function M.zero_(a) return M.fill_(a, 0) end

-- ---- reductions ----
local function opt_dim(what, dim)
  if type(dim) ~= "number" then core.raise(("%s: dim must be a number, got %s"):format(what, type(dim))) end
  -- Lua dims are 1-based like torch7; negative counts from the end.
  if dim > 0 then return dim - 1 end
  return dim
end

function M.sum(a, dim, keepdim)
  if dim == nil then return own(C.fl_sum(ptr(a, "sum")), "sum") end
  return own(C.fl_sum_dim(ptr(a, "sum"), opt_dim("sum", dim), keepdim and true or false), "sum")
end

function M.mean(a, dim, keepdim)
  if dim == nil then return own(C.fl_mean(ptr(a, "mean")), "mean") end
  return own(C.fl_mean_dim(ptr(a, "mean"), opt_dim("mean", dim), keepdim and true or false), "mean")
end

-- Returns values and (i64, 0-based) indices.
function M.max(a, dim, keepdim)
  local idx = ffi.new("fl_tensor *[1]")
  local v = own(C.fl_max_dim(ptr(a, "max"), opt_dim("max", dim), keepdim and true or false, idx), "max")
  return v, Tensor.wrap(idx[0])
end

function M.sum_squares(a) return tonumber(C.fl_sum_squares(ptr(a, "sum_squares"))) end

-- ---- shape ----
local function shape_arg(what, ...)
  local s = ...
  if type(s) ~= "table" then s = {...} end
  return Tensor.fill_shape(s, what)
end

function M.view(a, ...)
  local n, sb = shape_arg("view", ...)
  return own(C.fl_view(ptr(a, "view"), n, sb), "view")
end
M.reshape = M.view

-- dims are 1-based (negative from the end), as torch7.
local function dim0(d)
  if d > 0 then return d - 1 end
  return d
end

function M.transpose(a, d0, d1)
  local p = ptr(a, "transpose")
  return own(C.fl_transpose(p, dim0(d0), dim0(d1)), "transpose")
end

function M.permute(a, ...)
  local dims = ...
  if type(dims) ~= "table" then dims = {...} end
  for i = 1, #dims do dims_buf[i - 1] = dim0(dims[i]) end
  return own(C.fl_permute(ptr(a, "permute"), #dims, dims_buf), "permute")
end

-- narrow(dim, start, length): start is 1-based, as torch7.
function M.narrow(a, dim, start, length)
  return own(C.fl_narrow(ptr(a, "narrow"), dim0(dim), start - 1, length), "narrow")
end

function M.expand(a, ...)
  local n, sb = shape_arg("expand", ...)
  return own(C.fl_expand(ptr(a, "expand"), n, sb), "expand")
end

function M.contiguous(a) return own(C.fl_contiguous(ptr(a, "contiguous")), "contiguous") end

function M.to(a, dtype)
  return own(C.fl_cast(ptr(a, "to"), core.dtype_id(dtype, "to")), "to")
end
M.cast = M.to

function M.detach(a) return own(C.fl_detach(ptr(a, "detach")), "detach") end

function M.cat(list, dim)
  if type(list) ~= "table" or #list == 0 then error("cat: expected a non-empty list of tensors", 2) end
  if ptrs_buf_n < #list then ptrs_buf_n = #list * 2; ptrs_buf = ffi.new("fl_tensor *[?]", ptrs_buf_n) end
  for i = 1, #list do ptrs_buf[i - 1] = ptr(list[i], "cat", i) end
  return own(C.fl_cat(#list, ptrs_buf, dim0(dim or 1)), "cat")
end

function M.index_select(a, dim, index)
  return own(C.fl_index_select(ptr(a, "index_select", 1), dim0(dim), ptr(index, "index_select", 3)), "index_select")
end

-- split(a, size, dim): pieces of `size` along dim (the last may be shorter).
function M.split(a, size, dim)
  dim = dim or 1
  local len = a:size(dim)
  local out, start = {}, 1
  while start <= len do
    local l = math.min(size, len - start + 1)
    out[#out + 1] = M.narrow(a, dim, start, l)
    start = start + l
  end
  return out
end

-- ---- matmul / linear ----
function M.matmul(a, b) return own(C.fl_matmul(ptr(a, "matmul", 1), ptr(b, "matmul", 2)), "matmul") end

-- y = x W^T + b (Linear, w [out, in]); w_in_out for GPT-2's Conv1D (w [in, out]).
function M.linear(x, w, b, w_in_out)
  return own(C.fl_linear(ptr(x, "linear", 1), ptr(w, "linear", 2), b and ptr(b, "linear", 3) or nil, w_in_out and true or false), "linear")
end

-- ---- autograd ----
M.backward = require("fsdp.autograd").backward  -- jit.off'd: backward may call back into Lua (checkpoint)

function M.zero_grad_(t) C.fl_tensor_set_grad(ptr(t, "zero_grad"), nil) end

-- ---- methods and operators ----
for _, name in ipairs {"add", "sub", "mul", "div", "add_scaled", "scale", "add_scalar", "pow", "neg", "exp", "log",
                       "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "add_", "fill_", "copy_", "zero_", "sum", "mean",
                       "max", "sum_squares", "view", "reshape", "transpose", "permute", "narrow", "expand",
                       "contiguous", "to", "cast", "detach", "index_select", "split", "matmul", "backward"} do
  methods[name] = M[name]
end

Tensor.__add = M.add
Tensor.__sub = M.sub
Tensor.__mul = M.mul
Tensor.__div = M.div
Tensor.__unm = M.neg
Tensor.__pow = function(a, p) return M.pow(a, p) end

return M
