-- lua/fsdp/tensor_str.lua: how tensors print. The values follow PyTorch's torch/_tensor_str.py rule for rule
-- (one formatter for the whole tensor: integers as "1.", fixed "%.4f", or "%.4e" when the nonzero magnitudes span
-- more than 1000x, pass 1e8 or go below 1e-4; summarised with "..." past `threshold` elements, `edgeitems` per
-- dim; lines of at most `linewidth`), so `format(t, {info = false})` is exactly what PyTorch prints for the same
-- values. tostring(t) adds the suffixes PyTorch keeps implicit: shape, dtype, device, and for a parameter of a
-- sharded model whether it is sharded or gathered now, its FSDP unit and the rows this rank holds (the sharding
-- itself is parallel/'s; this file reads only Tensor.shard_info's generic fields).
local core = require "fsdp.core"

local C = core.C
local M = {}

local DEFAULTS = {precision = 4, threshold = 1000, edgeitems = 3, linewidth = 80, sci_mode = "auto"}
-- torch.set_printoptions' profiles
local PROFILES = {
  default = DEFAULTS,
  short = {precision = 2, threshold = 1000, edgeitems = 2, linewidth = 80, sci_mode = "auto"},
  full = {precision = 4, threshold = math.huge, edgeitems = 3, linewidth = 80, sci_mode = "auto"},
}
local opts = {}
for k, v in pairs(DEFAULTS) do opts[k] = v end

local PRINT_KEYS = {precision = true, threshold = true, edgeitems = true, linewidth = true, sci_mode = true,
                    profile = true}

local function nonneg_int(v) return type(v) == "number" and v >= 0 and v == math.floor(v) end

-- set_printoptions{precision =, threshold =, edgeitems =, linewidth =, sci_mode = true | false | "auto",
-- profile = "default" | "short" | "full"}: torch.set_printoptions (its sci_mode=None is "auto" here). A profile
-- is applied first, then the other keys.
function M.set_printoptions(o)
  o = core.check_opts("set_printoptions", o, PRINT_KEYS, 2)
  if o.profile ~= nil then
    local p = PROFILES[o.profile]
    if not p then
      core.raise(("set_printoptions: unknown profile '%s' (valid: default, full, short)"):format(tostring(o.profile)))
    end
    for k, v in pairs(p) do opts[k] = v end
  end
  for _, k in ipairs {"precision", "edgeitems"} do
    if o[k] ~= nil and not nonneg_int(o[k]) then
      core.raise(("set_printoptions: %s must be an integer >= 0, got %s"):format(k, tostring(o[k])))
    end
  end
  if o.threshold ~= nil and not (type(o.threshold) == "number" and o.threshold >= 0) then
    core.raise(("set_printoptions: threshold must be a number >= 0, got %s"):format(tostring(o.threshold)))
  end
  if o.linewidth ~= nil and not (nonneg_int(o.linewidth) and o.linewidth >= 1) then
    core.raise(("set_printoptions: linewidth must be an integer >= 1, got %s"):format(tostring(o.linewidth)))
  end
  if o.sci_mode ~= nil and type(o.sci_mode) ~= "boolean" and o.sci_mode ~= "auto" then
    core.raise(("set_printoptions: sci_mode must be true, false or \"auto\", got %s"):format(tostring(o.sci_mode)))
  end
  for k, v in pairs(o) do if k ~= "profile" then opts[k] = v end end
end

function M.get_printoptions()
  local out = {}
  for k, v in pairs(opts) do out[k] = v end
  return out
end

local FLOAT = {f32 = true, f64 = true, bf16 = true, f16 = true}

local function finite(v) return v == v and v ~= math.huge and v ~= -math.huge end

local function nonfinite_str(v)
  if v ~= v then return "nan" end
  return v > 0 and "inf" or "-inf"
end

local function int_str(v, dt)
  if dt == "bool" then return v ~= 0 and "True" or "False" end
  return ("%.0f"):format(v)   -- exact for every integer a double holds (%d would go through int32 or int64)
end

-- PyTorch's _Formatter: one width and one mode for every value printed, decided from `vals` (the values shown:
-- the summarised ones when the tensor is summarised). Note that non-finite values do not widen the columns.
local function new_formatter(vals, dt, o)
  local f = {floating = FLOAT[dt] or false, int_mode = true, sci = false, width = 1, prec = o.precision, dt = dt}
  if not f.floating then
    for _, v in ipairs(vals) do f.width = math.max(f.width, #int_str(v, dt)) end
    return f
  end
  local lo, hi, any = math.huge, 0, false
  for _, v in ipairs(vals) do
    if finite(v) and v ~= 0 then
      any = true
      local a = math.abs(v)
      if a < lo then lo = a end
      if a > hi then hi = a end
      if f.int_mode and v ~= math.ceil(v) then f.int_mode = false end
    end
  end
  if not any then return f end   -- as PyTorch: returns before sci_mode applies, so all zeros print "0."
  local efmt, ffmt = "%." .. o.precision .. "e", "%." .. o.precision .. "f"
  local function widen(fmt, extra)
    for _, v in ipairs(vals) do
      if finite(v) and v ~= 0 then f.width = math.max(f.width, #fmt:format(v) + extra) end
    end
  end
  if o.sci_mode == "auto" then f.sci = hi / lo > 1000 or hi > 1e8 or lo < 1e-4 else f.sci = o.sci_mode end
  if f.sci then widen(efmt, 0) elseif f.int_mode then widen("%.0f", 1) else widen(ffmt, 0) end
  return f
end

local function fmt_value(f, v)
  local s
  if not f.floating then
    s = int_str(v, f.dt)
  elseif not finite(v) then
    s = nonfinite_str(v)
  elseif f.sci then
    s = ("%." .. f.prec .. "e"):format(v)
  elseif f.int_mode then
    s = ("%.0f"):format(v) .. "."
  else
    s = ("%." .. f.prec .. "f"):format(v)
  end
  if #s < f.width then s = (" "):rep(f.width - #s) .. s end
  return s
end

-- The indices of one dim that print: all of them, or the first and last `edge` when summarising a longer dim.
local function shown(len, summarize, edge)
  local list = {}
  if summarize and len > 2 * edge then
    for i = 0, edge - 1 do list[#list + 1] = i end
    list[#list + 1] = false   -- the "..." slot
    for i = len - edge, len - 1 do list[#list + 1] = i end
  else
    for i = 0, len - 1 do list[#list + 1] = i end
  end
  return list
end

-- The body PyTorch prints after "tensor(" for a tensor with data: "[...]" nested by dims, or one value for 0-d.
-- `indent` is the column the body starts at (7, after "tensor(").
function M.body(t, o, indent)
  o = o or opts
  local p = t._p
  local shape, dt = t:shape(), t.dtype
  local numel = t:numel()
  if numel == 0 then return "[]" end
  local get = C.fl_tensor_get_flat
  if #shape == 0 then
    local v = tonumber(get(p, 0))
    return fmt_value(new_formatter({v}, dt, o), v)
  end
  local summarize = numel > o.threshold
  local edge = o.edgeitems
  local nd = #shape
  local strides, n = {}, 1
  for d = nd, 1, -1 do strides[d] = n; n = n * shape[d] end
  local idx = {}
  for d = 1, nd do idx[d] = shown(shape[d], summarize, edge) end
  -- the values the formatter sees: every element whose index in each dim is shown (get_summarized_data)
  local vals = {}
  if not (summarize and edge == 0) then
    local function collect(d, off)
      for _, i in ipairs(idx[d]) do
        if i then
          if d == nd then vals[#vals + 1] = tonumber(get(p, off + i))
          else collect(d + 1, off + i * strides[d]) end
        end
      end
    end
    collect(1, 0)
  end
  local f = new_formatter(vals, dt, o)
  local function vector(off, ind)
    local per_line = math.max(1, math.floor((o.linewidth - ind) / (f.width + 2)))
    local data = {}
    if summarize and edge == 0 then
      data[1] = "..."
    else
      for _, i in ipairs(idx[nd]) do
        data[#data + 1] = i and fmt_value(f, tonumber(get(p, off + i))) or " ..."
      end
    end
    local lines = {}
    for s = 1, #data, per_line do
      lines[#lines + 1] = table.concat(data, ", ", s, math.min(s + per_line - 1, #data))
    end
    return "[" .. table.concat(lines, ",\n" .. (" "):rep(ind + 1)) .. "]"
  end
  local function rec(d, off, ind)
    if d == nd then return vector(off, ind) end
    local slices = {}
    if summarize and edge == 0 then
      slices[1] = "..."   -- PyTorch's summarised data is then empty: every dim collapses to "..."
    else
      for _, i in ipairs(idx[d]) do
        slices[#slices + 1] = i and rec(d + 1, off + i * strides[d], ind + 1) or "..."
      end
    end
    return "[" .. table.concat(slices, "," .. ("\n"):rep(nd - d) .. (" "):rep(ind + 1)) .. "]"
  end
  return rec(1, 0, indent)
end

-- PyTorch's _add_suffixes: ", suffix" on the last line while it fits in linewidth, else on a new line indented.
local function add_suffixes(text, suffixes, indent, o)
  local parts = {text}
  local nl = text:find("\n[^\n]*$")
  -- PyTorch computes len - rfind("\n") + 1, which without a newline is len + 2: kept as it is
  local last = nl and (#text - (nl - 1) + 1) or (#text + 2)
  for _, s in ipairs(suffixes) do
    if last + #s + 2 > o.linewidth then
      parts[#parts + 1] = ",\n" .. (" "):rep(indent) .. s
      last = indent + #s
    else
      parts[#parts + 1] = ", " .. s
      last = last + #s + 2
    end
  end
  parts[#parts + 1] = ")"
  return table.concat(parts)
end

local function shape_str(s) return "[" .. table.concat(s, ", ") .. "]" end

-- format(t, {info = true}) -> the printed tensor. info = false: the values alone, "tensor([...])", which is
-- PyTorch's repr of the same values for f32, i64 and bool tensors on the CPU without autograd (PyTorch adds
-- dtype=, requires_grad=, grad_fn= suffixes otherwise). With info, the suffixes: shape, dtype, device,
-- requires_grad=True or grad_fn=<Name>; for a parameter of a sharded model fsdp=sharded|gathered and unit=; when
-- the values printed are this rank's rows of a larger tensor, rows=[first, end) of <rows>.
local FORMAT_OPTS = {info = true}
function M.format(t, fopts)
  fopts = core.check_opts("tensor format", fopts, FORMAT_OPTS, 2)
  local info = fopts.info ~= false
  local Tensor = getmetatable(t)
  local p = rawget(t, "_p")
  if p == nil then return "tensor(freed)" end
  -- a distributed parameter: the module's full tensor holds data only while gathered; its local part otherwise
  local loc = Tensor.local_of(t)
  local shard = Tensor.shard_info(loc)
  local show = t
  if loc ~= t and not t:has_data() then show = loc end
  local body
  if show.device == "meta" then body = "..."
  elseif not show:has_data() then body = "<released>"
  else body = M.body(show, opts, 7) end
  if not info then return "tensor(" .. body .. ")" end
  local suffixes = {"shape=" .. shape_str(show:shape()), "dtype=" .. show.dtype, "device=" .. show.device}
  local gfn = t.grad_fn
  if gfn then suffixes[#suffixes + 1] = ("grad_fn=<%s>"):format(gfn)
  elseif t.requires_grad then suffixes[#suffixes + 1] = "requires_grad=True" end
  if shard and shard.unit then
    suffixes[#suffixes + 1] = "fsdp=" .. (shard.state and shard.state() or "sharded")
    suffixes[#suffixes + 1] = "unit=" .. shard.unit
  end
  if shard and show == loc and shard.row0 then
    suffixes[#suffixes + 1] = ("rows=[%d, %d) of %d"):format(shard.row0, shard.row0 + shard.nrows, shard.full_rows)
  end
  return add_suffixes("tensor(" .. body, suffixes, 7, opts)
end

return M
