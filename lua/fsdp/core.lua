-- lua/fsdp/core.lua: loads the engine through the FFI (the symbols of the fsdp-lua executable, or
-- libfsdp.so under plain luajit/busted) and turns C failures into Lua errors.
local ffi = require "ffi"

local M = {}

ffi.cdef(require "fsdp._cdef")

-- Inside the fsdp-lua executable the engine is linked in; elsewhere load build/libfsdp.so next to lua/.
local function load_engine()
  local ok = pcall(function() return ffi.C.fl_version end)
  if ok then return ffi.C end
  local here = debug.getinfo(1, "S").source:match("^@(.*)/fsdp/core%.lua$") or "lua"
  local candidates = {os.getenv("FSDP_LIB"), here .. "/../build/libfsdp.so", "libfsdp.so"}
  local errs = {}
  for _, path in ipairs(candidates) do
    if path then
      local ok2, lib = pcall(ffi.load, path, true)
      if ok2 then return lib end
      errs[#errs + 1] = tostring(lib)
    end
  end
  error("fsdp: cannot load the engine (build it with `make`): " .. table.concat(errs, "; "))
end

M.C = load_engine()
local C = M.C

function M.last_error() return ffi.string(C.fl_last_error()) end

ffi.cdef "int getpid(void);"
-- A temporary name beside `path`, unique to this process: ranks that write the same file at once (DDP replicas
-- saving) each write their own and rename it into place, and no reader ever sees a half-written file.
-- This process's id; tmp_name takes another's when ranks write one file together (rank 0's).
function M.pid() return tonumber(ffi.C.getpid()) end
function M.tmp_name(path, pid) return ("%s.tmp.%d"):format(path, pid or M.pid()) end

-- Work that must finish when a script ends (an async checkpoint still being written): at_exit(name, fn) registers
-- fn once under `name` (registering the name again replaces it); run_exit_hooks() runs them in order and forgets
-- them. The fsdp-lua executable (engine/cli/main.c) calls it when the script returns and in os.exit(0), before
-- MPI goes, so hooks may communicate; under plain luajit a finalizer runs it when the Lua state closes.
local exit_hooks, exit_names = {}, {}
function M.at_exit(name, fn)
  local i = exit_names[name]
  if not i then i = #exit_hooks + 1; exit_names[name] = i end
  exit_hooks[i] = fn
end
function M.run_exit_hooks()
  local hooks = exit_hooks
  exit_hooks, exit_names = {}, {}
  for _, fn in ipairs(hooks) do fn() end
end
M._exit_sentinel = newproxy(true)
getmetatable(M._exit_sentinel).__gc = function()
  local ok, err = pcall(M.run_exit_hooks)
  if not ok then io.stderr:write("fsdp: at exit: ", tostring(err), "\n") end
end

-- The library's own directory: errors raised with M.raise point at the first caller outside it.
local LIB_PREFIX = debug.getinfo(1, "S").source:match("^(@.*/)fsdp/core%.lua$") or "@lua/"

-- raise(msg): error(msg) at the user's line: the innermost stack frame that is neither the library's Lua
-- (lua/fsdp/) nor C, however deep inside the library the check ran. One rule instead of counted levels.
function M.raise(msg)
  local level = 2
  while true do
    local info = debug.getinfo(level, "S")
    if not info then level = 1; break end   -- called from the library alone (e.g. the REPL): no position
    if info.what ~= "C" and info.source:sub(1, #LIB_PREFIX) ~= LIB_PREFIX then break end
    level = level + 1
  end
  error(msg, level)
end

-- Raises the engine's message (prefixed with `what`) at the user's line. `level` is accepted for old callers
-- and ignored: M.raise finds the line.
function M.fail(what, level) -- luacheck: ignore level
  M.raise(what .. ": " .. M.last_error())
end

function M.check(rc, what, level) -- luacheck: ignore level
  if rc < 0 then M.raise((what and (what .. ": ") or "") .. M.last_error()) end
  return rc
end

-- Constants come from the engine's header through the FFI (enums in engine/fsdp.h), never copied: a new dtype or
-- memory category there shows up here by itself. Names are the engine's own (fl_dtype_name) or the enum's, lowered.
M.dtypes, M.dtype_names = {}, {}
for id = 0, C.FL_NDTYPES - 1 do
  local name = ffi.string(C.fl_dtype_name(id))
  M.dtypes[name], M.dtype_names[id] = id, name
end
M.devices = {cpu = C.FL_CPU, meta = C.FL_META, cuda = C.FL_CUDA}
M.device_names = {}
for name, id in pairs(M.devices) do M.device_names[id] = name end
M.mem_categories = {other = C.FL_MEM_OTHER, param = C.FL_MEM_PARAM, param_unsharded = C.FL_MEM_PARAM_UNSHARDED,
                    grad = C.FL_MEM_GRAD, optim = C.FL_MEM_OPTIM, activation = C.FL_MEM_ACTIVATION}
assert(C.FL_MEM_NCATEGORIES == 6, "engine/fsdp.h has a memory category lua/fsdp/core.lua does not name")
-- Reduce ops by name, for the collectives.
M.reduce_ops = {sum = C.FL_REDUCE_SUM, avg = C.FL_REDUCE_AVG, max = C.FL_REDUCE_MAX}

function M.dtype_id(name, what)
  local id = M.dtypes[name]
  if not id then
    local names = {}
    for i = 0, #M.dtype_names do names[#names + 1] = M.dtype_names[i] end
    M.raise(("%s: unknown dtype '%s' (valid: %s)"):format(what or "dtype", tostring(name), table.concat(names, ", ")))
  end
  return id
end

function M.device_id(name, what)
  local id = M.devices[name]
  if not id then
    M.raise(("%s: unknown device '%s' (valid: cpu, meta%s)"):format(what or "device", tostring(name), ""))
  end
  return id
end

-- Option tables: unknown keys are errors that list the valid ones.
function M.check_opts(what, opts, valid, level) -- luacheck: ignore level
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    M.raise(("%s: options must be a table, got %s"):format(what, type(opts)))
  end
  for k in pairs(opts) do
    if not valid[k] then
      local names = {}
      for n in pairs(valid) do names[#names + 1] = n end
      table.sort(names)
      M.raise(("%s: unknown option '%s' (valid: %s)"):format(what, tostring(k), table.concat(names, ", ")))
    end
  end
  return opts
end

return M
