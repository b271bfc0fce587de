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
function M.tmp_name(path) return ("%s.tmp.%d"):format(path, ffi.C.getpid()) end

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

-- Raises the engine's message at the caller's caller (the user's line).
function M.fail(what, level)
  error(what .. ": " .. M.last_error(), (level or 2) + 1)
end

function M.check(rc, what, level)
  if rc < 0 then error((what and (what .. ": ") or "") .. M.last_error(), (level or 2) + 1) end
  return rc
end

M.dtypes = {f32 = 0, f64 = 1, bf16 = 2, f16 = 3, i32 = 4, i64 = 5, u8 = 6, bool = 7}
M.dtype_names = {[0] = "f32", "f64", "bf16", "f16", "i32", "i64", "u8", "bool"}
M.devices = {cpu = 0, meta = 1, cuda = 2}
M.device_names = {[0] = "cpu", "meta", "cuda"}
M.mem_categories = {other = 0, param = 1, param_unsharded = 2, grad = 3, optim = 4, activation = 5}

function M.dtype_id(name, what)
  local id = M.dtypes[name]
  if not id then
    error(("%s: unknown dtype '%s' (valid: f32, f64, bf16, f16, i32, i64, u8, bool)"):format(what or "dtype", tostring(name)), 3)
  end
  return id
end

function M.device_id(name, what)
  local id = M.devices[name]
  if not id then
    error(("%s: unknown device '%s' (valid: cpu, meta%s)"):format(what or "device", tostring(name), ""), 3)
  end
  return id
end

-- Option tables: unknown keys are errors that list the valid ones.
function M.check_opts(what, opts, valid, level)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(("%s: options must be a table, got %s"):format(what, type(opts)), (level or 2) + 1)
  end
  for k in pairs(opts) do
    if not valid[k] then
      local names = {}
      for n in pairs(valid) do names[#names + 1] = n end
      table.sort(names)
      error(("%s: unknown option '%s' (valid: %s)"):format(what, tostring(k), table.concat(names, ", ")), (level or 2) + 1)
    end
  end
  return opts
end

return M
