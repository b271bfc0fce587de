-- lua/fsdp/nn/module.lua: the Module base class. A module owns parameters (leaf tensors with requires_grad) and
-- child modules, both in registration order, and names them with Hugging Face's dotted names. It knows how each of
-- its parameters is initialised (a small spec), so a model built on `meta` can be materialised later — whole, or
-- only the local part of a distributed parameter (Tensor.local_of) — with the counter-based RNG keyed by the
-- parameter's full name. Parallelism (lua/fsdp/parallel/) attaches through the generic forward hooks below and
-- through Tensor.local_of; this file knows nothing of it.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"

local C = core.C
local Module = {}
Module.__index = Module

-- Makes a class table inheriting from `parent`. Metamethods are not inherited through __index, so each class
-- gets its own __call (-> forward) and __tostring.
function Module.class(name, parent)
  parent = parent or Module
  local cls = setmetatable({}, {__index = parent})
  cls.__index = cls
  cls.__name = name
  cls.__call = Module.__call
  cls.__tostring = Module.__tostring
  cls.__newindex = Module.__newindex
  return cls
end

-- Gives an instance a subclass of its class that adds `methods`, named tag .. class name (as FSDP2 turns a
-- module into an FSDP<Class>): a wrapper extends one model without touching the class or its other instances.
-- The subclass is made once per (class, tag); extending with the same tag again changes nothing.
local extensions = setmetatable({}, {__mode = "k"})
function Module.extend(self, tag, methods)
  local base = getmetatable(self)
  if rawget(base, "__extension") == tag then return self end
  local by_tag = extensions[base]
  if not by_tag then by_tag = {}; extensions[base] = by_tag end
  local cls = by_tag[tag]
  if not cls then
    cls = Module.class(tag .. (base.__name or "Module"), base)
    cls.__extension = tag
    for k, f in pairs(methods) do cls[k] = f end
    by_tag[tag] = cls
  end
  return setmetatable(self, cls)
end

-- Sets up the registries of a fresh instance; every constructor calls it first.
function Module.init(self)
  rawset(self, "_param_names", {})
  rawset(self, "_params", {})
  rawset(self, "_param_init", {})
  rawset(self, "_module_names", {})
  rawset(self, "_modules", {})
  self.training = true
  return self
end

local function check_name(self, what, name)
  if type(name) ~= "string" or name == "" or name:find(".", 1, true) then
    core.raise(("%s: name must be a non-empty string without dots, got %s"):format(what, tostring(name)))
  end
  if rawget(self, "_params") == nil then
    core.raise(("%s: call Module.init(self) in the constructor before registering '%s'"):format(what, name))
  end
  if self._params[name] ~= nil or self._modules[name] ~= nil then
    core.raise(("%s: '%s' is already registered on this %s"):format(what, name, self.__name or "module"))
  end
end

-- Init specs: {"normal", std = s} (mean 0), {"zeros"}, {"ones"}, or {"keep"} (leave the values as they are).
local INIT_KINDS = {normal = true, zeros = true, ones = true, keep = true}

-- register_parameter(name, tensor, init): tensor nil registers nothing (like torch's bias=None). The tensor
-- becomes a leaf requiring grad and is also reachable as self[name].
function Module:register_parameter(name, t, init)
  check_name(self, "register_parameter", name)
  if t == nil then return nil end
  if not Tensor.is_tensor(t) then
    error(("register_parameter: '%s' must be a tensor, got %s"):format(name, type(t)), 2)
  end
  if t.grad_fn ~= nil then
    error(("register_parameter: '%s' is the result of %s, not a leaf tensor"):format(name, t.grad_fn), 2)
  end
  init = init or {"keep"}
  if type(init) ~= "table" or not INIT_KINDS[init[1]] then
    error(("register_parameter: '%s': init must be {\"normal\", std=}, {\"zeros\"}, {\"ones\"} or {\"keep\"}"):format(name), 2)
  end
  if init[1] == "normal" and type(init.std) ~= "number" then
    error(("register_parameter: '%s': normal init needs a numeric std"):format(name), 2)
  end
  if not t.requires_grad then t.requires_grad = true end
  self._param_names[#self._param_names + 1] = name
  self._params[name] = t
  self._param_init[name] = init
  rawset(self, name, t)
  return t
end

-- Replaces an already registered parameter (tying, loading): same name, same position.
function Module:set_parameter(name, t)
  if self._params[name] == nil then error(("set_parameter: no parameter '%s' on this %s"):format(tostring(name), self.__name), 2) end
  if not Tensor.is_tensor(t) then error(("set_parameter: '%s' must be a tensor"):format(name), 2) end
  if not t.requires_grad then t.requires_grad = true end
  self._params[name] = t
  rawset(self, name, t)
end

function Module:register_module(name, m)
  check_name(self, "register_module", name)
  if getmetatable(m) == nil or rawget(m, "_params") == nil then
    error(("register_module: '%s' must be a module (built with Module.init), got %s"):format(name, type(m)), 2)
  end
  self._module_names[#self._module_names + 1] = name
  self._modules[name] = m
  rawset(self, name, m)
  return m
end

-- Parameters set directly as fields would be invisible to named_parameters: refuse them.
function Module.__newindex(self, k, v)
  if Tensor.is_tensor(v) then
    error(("module: assign parameter '%s' with register_parameter (or set_parameter), not a plain field"):format(tostring(k)), 2)
  end
  rawset(self, k, v)
end

-- Children in registration order: for name, child in m:named_children() do ... end
function Module:named_children()
  local i, names, mods = 0, self._module_names, self._modules
  return function()
    i = i + 1
    local n = names[i]
    if n then return n, mods[n] end
  end
end

function Module:children()
  local list = {}
  for _, n in ipairs(self._module_names) do list[#list + 1] = self._modules[n] end
  return list
end

-- Pre-order list of {name, module}; the root is "" (prefix given: the root is `prefix`).
local function collect_modules(m, prefix, out, seen)
  if seen[m] then return end
  seen[m] = true
  out[#out + 1] = {prefix, m}
  for _, n in ipairs(m._module_names) do
    collect_modules(m._modules[n], prefix == "" and n or (prefix .. "." .. n), out, seen)
  end
end

function Module:named_modules(prefix)
  local list = {}
  collect_modules(self, prefix or "", list, {})
  local i = 0
  return function()
    i = i + 1
    local e = list[i]
    if e then return e[1], e[2] end
  end
end

-- List of {name, tensor, module, local_name}, each tensor once (a tied weight keeps its first name, as torch).
-- The tensor is the parameter's local part (Tensor.local_of: what optimizers and clipping see, e.g. this rank's
-- shard); full_parameter_list gives the modules' own (full-shape) tensors.
function Module:parameter_list()
  local list = self:full_parameter_list()
  local local_of = Tensor.local_of
  for _, e in ipairs(list) do e[2] = local_of(e[2]) end
  return list
end

function Module:full_parameter_list()
  local out, seen, mods = {}, {}, {}
  collect_modules(self, "", mods, {})
  for _, e in ipairs(mods) do
    local prefix, m = e[1], e[2]
    for _, pn in ipairs(m._param_names) do
      local t = m._params[pn]
      if not seen[t] then
        seen[t] = true
        out[#out + 1] = {prefix == "" and pn or (prefix .. "." .. pn), t, m, pn}
      end
    end
  end
  return out
end

-- for name, p in model:named_parameters() do ... end  (HF dotted names, shared tensors once)
function Module:named_parameters()
  local list, i = self:parameter_list(), 0
  return function()
    i = i + 1
    local e = list[i]
    if e then return e[1], e[2] end
  end
end

function Module:parameters()
  local out = {}
  for i, e in ipairs(self:parameter_list()) do out[i] = e[2] end
  return out
end

-- The init spec of parameter `name` (full dotted name), e.g. {"normal", std = 0.02}.
function Module:parameter_init(name)
  for _, e in ipairs(self:parameter_list()) do
    if e[1] == name then return e[3]._param_init[e[4]] end
  end
  error(("parameter_init: no parameter '%s'"):format(tostring(name)), 2)
end

-- check_seed(seed, what): the seed of init_values is nil (0) or an integer in [0, 2^53) — exact in a double, as
-- fsdp.init's run seed; a string or 1.5 would otherwise be converted (or refused) by the FFI mid-initialisation.
function Module.check_seed(seed, what)
  if seed ~= nil and (type(seed) ~= "number" or seed ~= math.floor(seed) or not (seed >= 0 and seed < 2 ^ 53)) then
    core.raise(("%s: seed must be an integer in [0, 2^53), got %s"):format(what, type(seed) == "string"
               and ("'" .. seed .. "'") or tostring(seed)))
  end
end

-- Fills `t` per `init`, as element elem_offset.. of the full parameter `name` (FSDP initialises shards this way).
function Module.init_values(t, init, seed, name, elem_offset)
  local kind, p = init[1], Tensor.ptr(t, "init_values")
  if kind == "normal" then
    core.check(C.fl_tensor_normal_(p, seed, name, elem_offset or 0, 0, init.std), "init " .. name, 2)
  elseif kind == "zeros" then
    core.check(C.fl_tensor_fill_(p, 0), "init " .. name, 2)
  elseif kind == "ones" then
    core.check(C.fl_tensor_fill_(p, 1), "init " .. name, 2)
  end
  if init.zero_row then
    -- an embedding's padding row starts at zero: the part of elements [row * size, (row + 1) * size) of the
    -- full tensor that lies in this tensor's range [elem_offset, elem_offset + numel)
    local lo = math.max(init.zero_row * init.row_size, elem_offset or 0)
    local hi = math.min((init.zero_row + 1) * init.row_size, (elem_offset or 0) + t:numel())
    if hi > lo then
      local es = C.fl_dtype_size(C.fl_dtype_from_name(t.dtype))
      ffi.fill(ffi.cast("uint8_t *", t:data_ptr()) + (lo - (elem_offset or 0)) * es, (hi - lo) * es)
    end
  end
end

local MATERIALIZE_OPTS = {seed = true}

-- Allocates every meta parameter on the CPU and initialises it from its spec, keyed by its full dotted name:
-- the same seed gives the same model whatever else was built before. Parameters with data are left alone.
function Module:materialize(opts)
  opts = core.check_opts("materialize", opts, MATERIALIZE_OPTS, 2)
  Module.check_seed(opts.seed, "materialize")   -- before the first parameter is allocated
  local seed = opts.seed or 0
  for _, e in ipairs(self:full_parameter_list()) do
    local name, t, m, pn = e[1], e[2], e[3], e[4]
    local loc = Tensor.local_of(t)
    local info = loc ~= t and Tensor.shard_info(loc)
    if info and info.pending_init then
      -- distributed while still on meta (fully_shard before init, as torchtitan does): this rank's part only,
      -- as elements info.offset.. of the full initialisation
      local init = m._param_init[pn]
      if init[1] ~= "keep" and loc:numel() > 0 then Module.init_values(loc, init, seed, name, info.offset) end
      info.pending_init = nil
    elseif loc == t and t.device == "meta" then
      core.check(C.fl_tensor_storage_alloc(t._p), "materialize " .. name, 2)
      C.fl_tensor_set_category(t._p, core.mem_categories.param)
      local init = m._param_init[pn]
      if init[1] == "keep" then core.check(C.fl_tensor_fill_(t._p, 0), "materialize " .. name, 2)
      else Module.init_values(t, init, seed, name, 0) end
    end   -- else: data already there (a distributed parameter made from values keeps them)
  end
  return self
end

function Module:apply(fn)
  for _, n in ipairs(self._module_names) do self._modules[n]:apply(fn) end
  fn(self)
  return self
end

function Module:train(on)
  if on == nil then on = true end
  for _, m in self:named_modules() do m.training = on and true or false end
  return self
end

function Module:eval() return self:train(false) end

function Module:zero_grad()
  for _, t in ipairs(self:parameters()) do C.fl_tensor_set_grad(t._p, nil) end
end

-- Full tensors by HF name: {name = tensor}, each detached (sharing the parameter's data). Data-parallel extensions override it
-- (a sharded model gathers its shards; every rank must call it then). rank0_only: an empty table off rank 0.
local FSD_OPTS = {rank0_only = true}
function Module:full_state_dict(opts)
  opts = core.check_opts("full_state_dict", opts, FSD_OPTS, 2)
  local out = {}
  if opts.rank0_only and C.fl_dist_is_initialized() and C.fl_comm_rank(C.fl_comm_world()) ~= 0 then return out end
  for _, e in ipairs(self:parameter_list()) do out[e[1]] = e[2]:detach():contiguous() end
  return out
end

-- Whether the parameters are split across ranks (so whole-tensor exports must gather); extensions override it.
function Module:is_sharded() return false end

-- FSDP2's set_requires_gradient_sync: the data-parallel extensions (Module.extend) define it.
function Module:set_requires_gradient_sync()
  error(("set_requires_gradient_sync: this %s is not data-parallel (it is neither sharded nor wrapped by ddp)")
        :format(self.__name or "module"), 2)
end

function Module:num_parameters()
  local n = 0
  for _, t in ipairs(self:parameters()) do n = n + t:numel() end
  return n
end

function Module:forward()
  error(("%s: forward is not implemented"):format(self.__name or "module"), 2)
end

-- ---- forward hooks (torch's register_forward_pre_hook / register_forward_hook) ----
-- A pre-hook runs as fn(module, args) before forward, args = {n = count, ...}; it may return a new args table.
-- A hook runs as fn(module, args, output) after forward; it may return a replacement for the (first) output.
-- Hooks run in registration order; each registration returns a handle whose :remove() takes it off.
local function add_hook(self, field, fn, what)
  if type(fn) ~= "function" then core.raise(("%s: expected a function, got %s"):format(what, type(fn))) end
  local list = rawget(self, field)
  if not list then list = {}; rawset(self, field, list) end
  list[#list + 1] = fn
  return {remove = function()
    for i, f in ipairs(list) do if f == fn then table.remove(list, i); break end end
    if #list == 0 then rawset(self, field, nil) end
  end}
end

function Module:register_forward_pre_hook(fn) return add_hook(self, "_forward_pre_hooks", fn, "register_forward_pre_hook") end
function Module:register_forward_hook(fn) return add_hook(self, "_forward_hooks", fn, "register_forward_hook") end

local function pack(...) return {n = select("#", ...), ...} end

-- m(...) runs forward (through the hooks, when there are any); a module flagged `checkpoint` (activation
-- checkpointing) runs it through fsdp.autograd.checkpoint so that its activations are recomputed in backward.
function Module.__call(self, ...)
  local pre, post = rawget(self, "_forward_pre_hooks"), rawget(self, "_forward_hooks")
  if not pre and not post then return Module.plain_call(self, ...) end
  local args = pack(...)
  if pre then
    for _, h in ipairs(pre) do
      local r = h(self, args)
      if r ~= nil then args = r end
    end
  end
  local out = pack(Module.plain_call(self, unpack(args, 1, args.n)))
  if post then
    for _, h in ipairs(post) do
      local r = h(self, args, out[1])
      if r ~= nil then out[1] = r end
    end
  end
  return unpack(out, 1, out.n)
end

function Module.plain_call(self, x, ...)
  if rawget(self, "checkpoint") then
    local n, rest = select("#", ...), {...}
    return require("fsdp.autograd").checkpoint(function(h)
      return self:forward(h, unpack(rest, 1, n))
    end, x)
  end
  return self:forward(x, ...)
end

function Module:extra_repr() return "" end

-- A float as Python's repr writes it (shortest round trip; exponent form below 1e-4 and from 1e16): extra_repr
-- strings then read as PyTorch's ("eps=1e-06", "p=0.0").
function Module.repr_float(v)
  if v ~= v then return "nan" end
  if v == math.huge then return "inf" elseif v == -math.huge then return "-inf" end
  local s
  for p = 0, 16 do
    s = ("%." .. p .. "e"):format(v)
    if tonumber(s) == v then break end
  end
  local sign, mant, exp = s:match("^(%-?)([%d%.]+)e([%+%-]%d+)$")
  exp = tonumber(exp)
  local digits = mant:gsub("%.", ""):gsub("0+$", "")
  if digits == "" then digits = "0" end
  if exp < -4 or exp >= 16 then
    local m = digits:sub(1, 1) .. (#digits > 1 and ("." .. digits:sub(2)) or "")
    return ("%s%se%s%02d"):format(sign, m, exp < 0 and "-" or "+", math.abs(exp))
  elseif exp >= 0 then
    local int = digits:sub(1, exp + 1)
    int = int .. ("0"):rep(exp + 1 - #int)
    local frac = digits:sub(exp + 2)
    return sign .. int .. "." .. (frac == "" and "0" or frac)
  end
  return sign .. "0." .. ("0"):rep(-exp - 1) .. digits
end

-- Python's True / False, for extra_repr.
function Module.repr_bool(b) return b and "True" or "False" end

-- Notes the printed tree carries after a module's first line (besides its parameter count): nil here; a
-- data-parallel extension (Module.extend) overrides it to return fn(module) -> note or nil (FSDP: the unit).
function Module:module_notes() return nil end

local function with_commas(n)
  local sign, digits = ("%d"):format(n):match("^(%-?)(%d+)$")
  local grouped = digits:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  return sign .. (grouped:sub(1, 1) == "," and grouped:sub(2) or grouped)
end
Module.with_commas = with_commas

-- Parameters in a module's subtree, each tensor once (a tied weight counts in every subtree that holds it and
-- once in their common ancestor), by their full (global) shape, so a sharded model counts what it models.
local function count_params(m)
  local seen = {}
  local function walk(x)
    for _, pn in ipairs(x._param_names) do seen[x._params[pn]] = true end
    for _, n in ipairs(x._module_names) do walk(x._modules[n]) end
  end
  walk(m)
  local n = 0
  for t in pairs(seen) do n = n + t:numel() end
  return n
end

-- PyTorch's _addindent: every line after the first indented by `n` spaces.
local function addindent(s, n)
  return (s:gsub("\n", "\n" .. (" "):rep(n)))
end

-- Replaces the dotted name `path` (followed by a non-digit or the end) by `with` in s: a ModuleList's children
-- compare equal when they differ only by their own index (a unit named after each block).
local function replace_path(s, path, with)
  local out, i = {}, 1
  while true do
    local a, b = s:find(path, i, true)
    if not a then break end
    local nxt = s:sub(b + 1, b + 1)
    if nxt:match("%d") then
      out[#out + 1] = s:sub(i, b)
    else
      out[#out + 1] = s:sub(i, a - 1) .. with
    end
    i = b + 1
  end
  out[#out + 1] = s:sub(i)
  return table.concat(out)
end

-- The tree as PyTorch's nn.Module.__repr__ prints it: Class(extra_repr) for a leaf; for a parent, its extra_repr
-- and then "(name): child" lines indented by two; a ModuleList's runs of identical children as
-- "(0-31): 32 x Block(...)" (classes that set fold_repeats). Class names are the model's (transformers' names,
-- from the root's _class_names).
-- Each module with parameters ends its first line with "  # N params", plus the root's module_notes.
local function render(m, path, ctx)
  local cls = m.__name or "Module"
  local name = ctx.names[cls] or cls
  local extra = m:extra_repr()
  local extra_lines = {}
  if extra ~= "" then for line in (extra .. "\n"):gmatch("(.-)\n") do extra_lines[#extra_lines + 1] = line end end
  local child_lines = {}
  local function child_path(n) return path == "" and n or (path .. "." .. n) end
  if m.fold_repeats then
    local reprs, keys = {}, {}
    for i, n in ipairs(m._module_names) do
      local cp = child_path(n)
      reprs[i] = render(m._modules[n], cp, ctx)
      keys[i] = path ~= "" and replace_path(reprs[i], cp, path .. ".\0") or reprs[i]
    end
    local i = 1
    while i <= #reprs do
      local j = i
      while j < #reprs and keys[j + 1] == keys[i] do j = j + 1 end
      local line
      if j > i then
        local r = path ~= "" and replace_path(keys[i], path .. ".\0", ("%s.{%s-%s}"):format(path,
          m._module_names[i], m._module_names[j])) or reprs[i]
        line = ("(%s-%s): %d x %s"):format(m._module_names[i], m._module_names[j], j - i + 1, r)
      else
        line = ("(%s): %s"):format(m._module_names[i], reprs[i])
      end
      child_lines[#child_lines + 1] = addindent(line, 2)
      i = j + 1
    end
  else
    for _, n in ipairs(m._module_names) do
      child_lines[#child_lines + 1] = "(" .. n .. "): " .. addindent(render(m._modules[n], child_path(n), ctx), 2)
    end
  end
  local notes = {}
  local count = count_params(m)
  if count > 0 then notes[#notes + 1] = with_commas(count) .. (count == 1 and " param" or " params") end
  local note = ctx.note and ctx.note(m)
  if note then notes[#notes + 1] = note end
  local tail = #notes > 0 and ("  # " .. table.concat(notes, "; ")) or ""
  if #child_lines == 0 and #extra_lines <= 1 then return name .. "(" .. (extra_lines[1] or "") .. ")" .. tail end
  local lines = {}
  for _, l in ipairs(extra_lines) do lines[#lines + 1] = l end
  for _, l in ipairs(child_lines) do lines[#lines + 1] = l end
  return name .. "(" .. tail .. "\n  " .. table.concat(lines, "\n  ") .. "\n)"
end

function Module.__tostring(m)
  return render(m, "", {names = rawget(m, "_class_names") or {}, note = m:module_notes()})
end

return Module
