-- lua/fsdp/repl.lua: the logic of the interactive REPL; engine/cli/main.c only reads lines (libedit) and calls
-- feed(line), which returns true while the statement is incomplete. Lines accumulate until they compile,
-- "return <line>" is tried first so that expressions print, top-level locals are kept (rewritten to
-- variables of one persistent environment where `fsdp` is preloaded), and errors never end the session.
local M = {}

-- ---- top-level `local` rewriting ----
-- Finds the byte ranges of the `local` keywords at block depth 0 of a chunk, skipping strings and comments.
local OPEN = {["function"] = true, ["if"] = true, ["do"] = true, ["repeat"] = true}
local CLOSE = {["end"] = true, ["until"] = true}

local function long_bracket(src, i)   -- src:sub(i) starts with [ ; returns the end of [==[ ... ]==] or nil
  local eq = src:match("^%[(=*)%[", i)
  if not eq then return nil end
  local _, e = src:find("]" .. eq .. "]", i + #eq + 2, true)
  return e or #src
end

local function top_level_locals(src)
  local found, depth, i, n = {}, 0, 1, #src
  while i <= n do
    local c = src:sub(i, i)
    if c == "-" and src:sub(i, i + 1) == "--" then
      local e = src:sub(i + 2, i + 2) == "[" and long_bracket(src, i + 2)
      i = (e or (src:find("\n", i, true) or n)) + 1
    elseif c == "\"" or c == "'" then
      local j = i + 1
      while j <= n do
        local d = src:sub(j, j)
        if d == "\\" then j = j + 1 elseif d == c then break end
        j = j + 1
      end
      i = j + 1
    elseif c == "[" and long_bracket(src, i) then
      i = long_bracket(src, i) + 1
    elseif c:match("[%a_]") then
      local s, e = src:find("^[%w_]+", i)
      local word = src:sub(s, e)
      if OPEN[word] then depth = depth + 1
      elseif CLOSE[word] then depth = depth - 1
      elseif word == "local" and depth == 0 then found[#found + 1] = {s, e} end
      i = e + 1
    elseif c:match("%d") then
      i = (select(2, src:find("^[%w_%.]+", i)) or i) + 1
    else
      i = i + 1
    end
  end
  return found
end

-- `local x = 1` -> `x = 1`, `local function f` -> `function f`: the names then live in the environment.
local function globalize(src)
  local ranges = top_level_locals(src)
  for k = #ranges, 1, -1 do
    local s, e = ranges[k][1], ranges[k][2]
    src = src:sub(1, s - 1) .. src:sub(e + 1)
  end
  return src, #ranges > 0
end

-- ---- printing ----
local function render(v, depth)
  local mt = getmetatable(v)
  if type(v) == "string" then return depth > 0 and ("%q"):format(v) or v end
  if type(v) ~= "table" or (mt and mt.__tostring) or depth > 1 then return tostring(v) end
  -- Plain tables: sorted keys, one level deep, at most 20 entries.
  local keys, parts = {}, {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  local seq = #v
  for idx, k in ipairs(keys) do
    if idx > 20 then parts[#parts + 1] = ("... (%d more)"):format(#keys - 20); break end
    local val = render(v[k], depth + 1)
    if type(k) == "number" and k >= 1 and k <= seq and k == math.floor(k) then parts[#parts + 1] = val
    elseif type(k) == "string" and k:match("^[%a_][%w_]*$") then parts[#parts + 1] = k .. " = " .. val
    else parts[#parts + 1] = "[" .. render(k, 1) .. "] = " .. val end
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end
M.render = function(v) return render(v, 0) end

-- ---- sessions ----
local Session = {}
Session.__index = Session

-- new{out = fn(str), err = fn(str), env = table}: an independent REPL (the spec drives several).
function M.new(opts)
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "out" and k ~= "err" and k ~= "env" then
      error(("repl.new: unknown option '%s' (valid: env, err, out)"):format(tostring(k)), 2)
    end
  end
  local env = opts.env
  if not env then
    env = setmetatable({}, {__index = _G})
    env.fsdp = require "fsdp"
    env._G = env
  end
  return setmetatable({
    env = env,
    buf = nil,
    out = opts.out or function(s) io.stdout:write(s); io.stdout:flush() end,
    err = opts.err or function(s) io.stderr:write(s); io.stderr:flush() end,
  }, Session)
end

local function pack(...) return select("#", ...), {...} end

local function incomplete(msg) return msg:sub(-7) == "'<eof>'" end

-- Compiles src as the REPL would: `return src` first, then src with top-level locals kept, then src as is.
-- Returns the function, or nil plus the error (nil error means: wait for more lines).
local function compile(src, env)
  -- An argument list rather than `return src`: a tail call would drop the user's frame from error positions.
  local f = loadstring("return (function(...) return ... end)(" .. src .. "\n)", "=stdin")
  if not f then
    local g, changed = globalize(src)
    local err
    f, err = loadstring(g, "=stdin")
    if not f and changed then f = loadstring(src, "=stdin") end
    if not f then
      local _, rerr = loadstring("return " .. src, "=stdin")   -- an expression cut short: "{1,"
      if incomplete(err) or incomplete(rerr) then return nil, nil end
      return nil, err
    end
  end
  return setfenv(f, env)
end

local function traceback(e)
  -- Keep the user's frames: cut the traceback where the REPL's own frames begin.
  local tb = debug.traceback(tostring(e), 2)
  local cut = tb:find("\n[^\n]*in function 'xpcall'") or tb:find("\n[^\n]*fsdp/repl%.lua")
  return cut and tb:sub(1, cut - 1) or tb
end

-- feed(line): runs the statement once it is complete; returns true while more lines are needed.
function Session:feed(line)
  if self.buf == nil and line:sub(1, 1) == "=" then line = "return " .. line:sub(2) end  -- lua 5.1's "=expr"
  local src = self.buf and (self.buf .. "\n" .. line) or line
  if src:match("^%s*$") then self.buf = nil; return false end
  local f, err = compile(src, self.env)
  if not f and not err then self.buf = src; return true end
  self.buf = nil
  if not f then self.err(err .. "\n"); return false end
  local n, r = pack(xpcall(f, traceback))
  if not r[1] then self.err(tostring(r[2]) .. "\n"); return false end
  if n > 1 then   -- `return nil` prints nil; a statement prints nothing
    local parts = {}
    for i = 2, n do parts[#parts + 1] = render(r[i], 0) end
    self.out(table.concat(parts, "\t") .. "\n")
  end
  return false
end

-- Drops a half-typed statement (Ctrl-C at a continuation prompt).
function Session:reset() self.buf = nil end

-- The session main.c drives.
local default
function M.feed(line)
  default = default or M.new()
  return default:feed(line)
end

function M.session()
  default = default or M.new()
  return default
end

M.globalize = globalize

return M
