-- lua/fsdp/repl.lua: the logic of the interactive REPL. engine/cli/main.c reads lines (libedit), keeps the
-- history, turns Ctrl-C into an interrupt and calls run(cli); everything else is here: lines accumulate until
-- they compile, "return <line>" is tried first so that expressions print, top-level locals are kept (rewritten
-- to variables of one persistent environment where `fsdp` is preloaded), errors never end the session, TAB
-- completes names, fields and methods.
--
-- On N ranks (fsdp-lua -n N -i) rank 0 reads a statement and broadcasts it over a control group (the engine's
-- fl_comm_control_new: its operations run on the main thread, outside the queue that a half-entered collective
-- may block), every rank runs it with print/io.write captured, every rank gathers everyone's answer, output and
-- error, and rank 0 prints them grouped: what agrees on all ranks once, the rest once per group of ranks with
-- equal text, named "[rank 0,2]". Collectives raise after a short timeout instead of aborting the job, and after
-- every statement fl_comm_resync puts the groups back in step, so that the next statement's collectives match.
local ffi = require "ffi"

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
  if type(v) ~= "table" or (mt and mt.__tostring) then return tostring(v) end
  -- deeper tables are elided, not shown by address: equal answers on several ranks then print alike, once
  if depth > 1 then return next(v) == nil and "{}" or "{...}" end
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

-- ---- completion ----
-- complete(env, word): the completions of the word before the cursor, whole words, sorted. A word is a chain of
-- names joined by '.' with at most one ':' before the last: `fsdp.mo` -> `fsdp.models`, `m:na` ->
-- `m:named_children`, .... Fields are a table's own keys and, as Torch7's trepl does, those reached through its
-- metatable's __index tables, up the chain of classes. An object whose __index is a function can list its names
-- with a metatable field __completions(obj) returning an array (fsdp's lazy modules, tensors' methods). Names
-- starting with '_' are offered only when the typed part starts with '_'. Evaluating the prefix indexes tables
-- (which may load a lazy module), never calls a function.
local KEYWORDS = {"and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
                  "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while"}

local function index(v, k)
  local ok, r = pcall(function() return v[k] end)
  if ok then return r end
  return nil
end

local function field_names(v, add)
  local seen, depth = {}, 0
  while v ~= nil and depth < 16 and not seen[v] do
    seen[v] = true
    if type(v) == "table" then
      for k in pairs(v) do if type(k) == "string" then add(k) end end
    end
    local mt = getmetatable(v)
    if type(mt) ~= "table" then break end
    local list = rawget(mt, "__completions")
    if type(list) == "function" then
      local ok, names = pcall(list, v)
      if ok and type(names) == "table" then for _, k in ipairs(names) do add(k) end end
    end
    local idx = rawget(mt, "__index")
    if type(idx) ~= "table" then break end
    v, depth = idx, depth + 1
  end
end

function M.complete(env, word)
  local head, sep, part = word:match("^(.*)([%.:])([%w_]*)$")
  local names, out = {}, {}
  local function add(k) if k:match("^[%a_][%w_]*$") then names[k] = true end end
  local target
  if head then
    if not head:match("^[%a_][%w_]*$") and not head:match("^[%a_][%w_%.]*[%w_]$") then return out end
    target = env
    for name in head:gmatch("[^%.]+") do
      target = index(target, name)
      if target == nil then return out end
    end
    field_names(target, add)
  else
    part, head, sep = word, "", ""
    if not part:match("^[%a_]?[%w_]*$") then return out end
    field_names(env, add)
    for _, k in ipairs(KEYWORDS) do names[k] = true end
  end
  local hidden = part:sub(1, 1) ~= "_"
  for k in pairs(names) do
    if k:sub(1, #part) == part and not (hidden and k:sub(1, 1) == "_") then
      if sep ~= ":" or type(index(target, k)) == "function" then out[#out + 1] = head .. sep .. k end
    end
  end
  table.sort(out)
  return out
end

-- ---- sessions ----
local Session = {}
Session.__index = Session

local SESSION_OPTS = {out = true, err = true, env = true, cli = true}

-- new{out = fn(str), err = fn(str), env = table, cli = main.c's functions}: an independent REPL (the spec
-- drives several). With cli, statements run with Ctrl-C armed (cli.executing).
function M.new(opts)
  opts = opts or {}
  for k in pairs(opts) do
    if not SESSION_OPTS[k] then
      error(("repl.new: unknown option '%s' (valid: cli, env, err, out)"):format(tostring(k)), 2)
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
    cli = opts.cli,
    out = opts.out or function(s) io.stdout:write(s); io.stdout:flush() end,
    err = opts.err or function(s) io.stderr:write(s); io.stderr:flush() end,
  }, Session)
end

local function pack(...) return select("#", ...), {...} end

local function incomplete(msg) return msg:sub(-7) == "'<eof>'" end

-- Compiles src as the REPL would: `return src` first, then src with top-level locals kept, then src as is.
-- Returns the function, or nil plus the error (nil error means: wait for more lines). The function runs in
-- LuaJIT's interpreter (jit.off), where the interrupt hook is seen: a compiled loop would never look.
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
  if jit then jit.off(f, true) end
  return setfenv(f, env)
end
M.compile = compile

local function traceback(e)
  -- Keep the user's frames: cut the traceback where the REPL's own frames begin.
  local tb = debug.traceback(tostring(e), 2)
  local cut = tb:find("\n[^\n]*in function 'xpcall'") or tb:find("\n[^\n]*fsdp/repl%.lua")
  return cut and tb:sub(1, cut - 1) or tb
end

-- push(line): "more" (the statement goes on), "empty", "error", msg (it cannot compile) or "ready", f, src.
function Session:push(line)
  if self.buf == nil and line:sub(1, 1) == "=" then line = "return " .. line:sub(2) end  -- lua 5.1's "=expr"
  local src = self.buf and (self.buf .. "\n" .. line) or line
  if src:match("^%s*$") then self.buf = nil; return "empty" end
  local f, err = compile(src, self.env)
  if not f and not err then self.buf = src; return "more" end
  self.buf = nil
  if not f then return "error", err end
  return "ready", f, src
end

-- run(f): runs a compiled statement; returns nil, traceback on error, else the rendered values ("2\tx") or
-- false for a statement that returned nothing.
function Session:run(f)
  local cli = self.cli
  if cli then cli.executing(true) end
  local n, r = pack(xpcall(f, traceback))
  if cli then cli.executing(false) end
  if not r[1] then return nil, tostring(r[2]) end
  if n == 1 then return false end   -- `return nil` prints nil; a statement prints nothing
  local parts = {}
  for i = 2, n do parts[#parts + 1] = render(r[i], 0) end
  return table.concat(parts, "\t")
end

-- feed(line): runs the statement once it is complete; returns true while more lines are needed.
function Session:feed(line)
  local kind, f = self:push(line)
  if kind == "more" then return true end
  if kind == "error" then self.err(f .. "\n") end
  if kind ~= "ready" then return false end
  local value, err = self:run(f)
  if value == nil then self.err(err .. "\n")
  elseif value then self.out(value .. "\n") end
  return false
end

-- Drops a half-typed statement (Ctrl-C at a continuation prompt).
function Session:reset() self.buf = nil end

function Session:complete(word) return M.complete(self.env, word) end

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

-- ---- grouped output of several ranks ----

-- "0", "0,2", "0-3,5": ranks (0-based, ascending), runs of three or more as ranges.
local function rank_list(ranks)
  local parts, i = {}, 1
  while i <= #ranks do
    local j = i
    while j < #ranks and ranks[j + 1] == ranks[j] + 1 do j = j + 1 end
    if j - i >= 2 then parts[#parts + 1] = ranks[i] .. "-" .. ranks[j]
    else for k = i, j do parts[#parts + 1] = tostring(ranks[k]) end end
    i = j + 1
  end
  return table.concat(parts, ",")
end
M.rank_list = rank_list

-- Every line of text prefixed with "[rank <list>] ".
local function prefixed(ranks, text)
  local p = "[rank " .. rank_list(ranks) .. "] "
  if text:sub(-1) ~= "\n" then text = text .. "\n" end
  return (text:gsub("([^\n]*)\n", function(l) return p .. l .. "\n" end))
end

-- Groups the ranks (0-based) by equal text, in order of each group's first rank; texts[r + 1] nil: rank r has
-- none. Returns {{ranks = {...}, text = ...}, ...}.
local function groups(texts, n)
  local list, by = {}, {}
  for r = 0, n - 1 do
    local t = texts[r + 1]
    if t ~= nil then
      local g = by[t]
      if not g then g = {ranks = {}, text = t}; by[t] = g; list[#list + 1] = g end
      g.ranks[#g.ranks + 1] = r
    end
  end
  return list
end

-- format(results, n): what rank 0 prints for one statement, as {out = stdout text, err = stderr text}.
-- results[r + 1] = {output = captured print/io.write text, value = rendered values or false, error = traceback
-- or nil}. Output is always prefixed with the ranks that printed it; a value or an error that every rank has
-- alike is shown once, bare; otherwise once per group of ranks with equal text, prefixed.
function M.format(results, n)
  local out, err = {}, {}
  local outputs, values, errors = {}, {}, {}
  for r = 0, n - 1 do
    local x = results[r + 1]
    if x.output ~= "" then outputs[r + 1] = x.output end
    if x.error then errors[r + 1] = x.error elseif x.value then values[r + 1] = x.value end
  end
  for _, g in ipairs(groups(outputs, n)) do out[#out + 1] = prefixed(g.ranks, g.text) end
  local function emit(texts, into)
    local gs = groups(texts, n)
    if #gs == 1 and #gs[1].ranks == n then
      into[#into + 1] = gs[1].text .. "\n"
    else
      for _, g in ipairs(gs) do into[#into + 1] = prefixed(g.ranks, g.text) end
    end
  end
  emit(values, out)
  emit(errors, err)
  return {out = table.concat(out), err = table.concat(err)}
end

-- ---- capture of what a rank prints during a statement ----
local CAPTURE_LIMIT = 1024 * 1024   -- bytes kept per rank and statement; the rest is counted, not shown

local function capture_begin()
  local buf, size, dropped = {}, 0, 0
  local function put(s)
    if size + #s > CAPTURE_LIMIT then
      local keep = math.max(0, CAPTURE_LIMIT - size)
      dropped = dropped + #s - keep
      s = s:sub(1, keep)
    end
    if #s > 0 then buf[#buf + 1] = s; size = size + #s end
  end
  local saved = {print = print, write = io.write, stdout = io.stdout}
  local proxy = setmetatable({}, {__index = function(_, k)
    local v = saved.stdout[k]
    if type(v) == "function" then return function(_, ...) return v(saved.stdout, ...) end end
    return v
  end})
  function proxy.write(self, ...)
    for i = 1, select("#", ...) do put(tostring((select(i, ...)))) end
    return self
  end
  function proxy.flush() return true end
  _G.print = function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do parts[i] = tostring((select(i, ...))) end
    put(table.concat(parts, "\t") .. "\n")
  end
  -- The capture replaces io's fields for the statement, and puts them back after.
  io.write = function(...) proxy:write(...); return proxy end  -- luacheck: ignore 122
  io.stdout = proxy  -- luacheck: ignore 122
  return function()   -- ends the capture: the text
    _G.print, io.write, io.stdout = saved.print, saved.write, saved.stdout  -- luacheck: ignore 122
    local s = table.concat(buf)
    if dropped > 0 then s = s .. ("\n... (%d more bytes not shown)\n"):format(dropped) end
    return s
  end
end

-- ---- the loops main.c runs ----

local timeout_s = nil   -- the multi-rank REPL's collective timeout while it runs; nil: no REPL

-- fsdp.repl_timeout(seconds): sets the seconds a collective may wait in the multi-rank REPL before it fails
-- (every group's timeout; also resync's); returns the value in force. Without seconds it only returns it.
function M.timeout(s)
  if timeout_s == nil then
    error("fsdp.repl_timeout: no REPL is running (in a script use fsdp.init{timeout =} or group:set_timeout)", 2)
  end
  if s ~= nil then
    if type(s) ~= "number" or not (s > 0) then  -- luacheck: ignore 581 (not > also rejects NaN)
      error(("fsdp.repl_timeout: expected a positive number of seconds, got %s"):format(tostring(s)), 2)
    end
    timeout_s = s
    require("fsdp.core").C.fl_comm_set_timeout_all(s)
  end
  return timeout_s
end

local function env_timeout()
  local v = os.getenv("FSDP_REPL_TIMEOUT")
  if v == nil or v == "" then return 5 end
  local t = tonumber(v)
  if not t or not (t > 0) then  -- luacheck: ignore 581
    error(("FSDP_REPL_TIMEOUT must be a positive number of seconds, got '%s'"):format(v), 0)
  end
  return t
end

local function banner(cli, n)
  local keys = cli.isatty() and "Ctrl-C interrupts, Ctrl-D exits." or "Ctrl-D exits."
  if n == 1 then
    io.stdout:write(("fsdp-lua %s (LuaJIT). %s\n"):format(cli.version, keys))
  else
    io.stdout:write(("fsdp-lua %s (LuaJIT) on %d ranks: every rank runs each line. %s\n")
      :format(cli.version, n, keys))
  end
  io.stdout:flush()
end

local function read_statement(s, cli)
  -- rank 0's reading: returns the source of a complete statement, or nil at end of input
  while true do
    local line = cli.readline(s.buf and ">> " or "> ")
    if line == nil then return nil end
    if line == false then
      s:reset()
      io.stdout:write("\n")
      io.stdout:flush()
    else
      if line:match("%S") and cli.isatty() then cli.add_history(line) end
      local kind, f, src = s:push(line)
      if kind == "error" then s.err(f .. "\n")
      elseif kind == "ready" then return src, f end
    end
  end
end

local function run_single(s, cli)
  banner(cli, 1)
  while true do
    local src, f = read_statement(s, cli)
    if src == nil then break end
    local value, err = s:run(f)
    if value == nil then s.err(err .. "\n")
    elseif value then s.out(value .. "\n") end
  end
  io.stdout:write("\n")
  io.stdout:flush()
end

-- One record per rank and statement, as Lua source (rank 0 loads it in an empty environment).
local function encode(x)
  return ("return {output = %q, value = %s, error = %s}")
    :format(x.output, x.value and ("%q"):format(x.value) or "false", x.error and ("%q"):format(x.error) or "nil")
end

local function decode(s, r)
  local f = loadstring(s, "=rank " .. r)
  local ok, x = pcall(setfenv(f or error, {}))
  if not ok or type(x) ~= "table" then return {output = "", value = false, error = "(unreadable result)"} end
  return x
end

local function run_ranks(s, cli, n)
  local fsdp = require "fsdp"
  local core = require "fsdp.core"
  local Tensor = require "fsdp.tensor"
  local C = core.C
  local rank = fsdp.rank()
  local ctrl = C.fl_comm_control_new(fsdp.dist.comm_ptr(nil), "repl")
  if ctrl == nil then error("repl: " .. core.last_error(), 0) end
  ctrl = ffi.gc(ctrl, C.fl_comm_release)
  timeout_s = env_timeout()
  C.fl_comm_set_timeout_errors(true)
  C.fl_comm_set_timeout_all(timeout_s)

  local function check(rc, what)
    if rc < 0 then fsdp.dist.abort("repl: " .. what .. ": " .. core.last_error()) end
  end
  -- rank 0's string to every rank (nil: the REPL ends): its length first, then its bytes
  local function broadcast(str)
    local len = Tensor.full({1}, str and #str or -1, {dtype = "i64"})
    check(C.fl_broadcast(ctrl, len._p, 0), "broadcast")
    local k = len:item()
    if k < 0 then return nil end
    if k == 0 then return "" end
    local buf = Tensor.zeros({k}, {dtype = "u8"})
    if rank == 0 then ffi.copy(buf:data_ptr(), str, k) end
    check(C.fl_broadcast(ctrl, buf._p, 0), "broadcast")
    return ffi.string(buf:data_ptr(), k)
  end
  -- every rank's string, on every rank: the lengths, then the strings padded to the longest
  local function all_gather(str)
    local lens = Tensor.zeros({n}, {dtype = "i64"})
    check(C.fl_all_gather(ctrl, lens._p, Tensor.full({1}, #str, {dtype = "i64"})._p), "all_gather")
    local l, most = lens:totable(), 0
    for r = 1, n do most = math.max(most, l[r]) end
    local res = {}
    if most == 0 then for r = 1, n do res[r] = "" end; return res end
    local pad = Tensor.zeros({most}, {dtype = "u8"})
    ffi.copy(pad:data_ptr(), str, #str)
    local all = Tensor.zeros({n * most}, {dtype = "u8"})
    check(C.fl_all_gather(ctrl, all._p, pad._p), "all_gather")
    local p = all:data_ptr("const char *")
    for r = 1, n do res[r] = ffi.string(p + (r - 1) * most, l[r]) end
    return res
  end

  if rank == 0 then banner(cli, n) end
  while true do
    local src, f
    if rank == 0 then src, f = read_statement(s, cli) end
    src = broadcast(src)
    if src == nil then break end
    local mine = {output = "", value = false}
    if rank ~= 0 then
      local err
      f, err = compile(src, s.env)
      if not f then mine.error = err or "incomplete statement" end   -- rank 0 compiled it: cannot differ
    end
    if f then
      local stop = capture_begin()
      local ok, value, err = pcall(s.run, s, f)
      mine.output = stop()
      if not ok then mine.error = tostring(value)
      elseif value == nil then mine.error = err
      else mine.value = value end
    end
    -- every group back in step before anyone prints or reads the next line
    local resync_rc = C.fl_comm_resync(ctrl, timeout_s)
    local resync_err = resync_rc < 0 and core.last_error() or nil
    local texts = all_gather(encode(mine))
    if rank == 0 then
      local results = {}
      for r = 1, n do results[r] = decode(texts[r], r - 1) end
      local shown = M.format(results, n)
      io.stdout:write(shown.out)
      io.stdout:flush()
      io.stderr:write(shown.err)
      io.stderr:flush()
    end
    if resync_err then
      -- the same message on every rank (resync agrees): one rank says it, all end
      fsdp.dist.abort(rank == 0 and ("repl: the groups could not be put back in step, ending the job: " ..
                                     resync_err) or nil)
    end
  end
  timeout_s = nil
  if rank == 0 then io.stdout:write("\n"); io.stdout:flush() end
end

-- run(cli): the REPL of this process; returns at Ctrl-D (on rank 0, for every rank).
function M.run(cli)
  local fsdp = require "fsdp"
  local s = M.new{cli = cli}
  default = s
  cli.set_completer(function(word) return s:complete(word) end)
  local n = fsdp.world_size()
  if n == 1 then
    timeout_s = env_timeout()
    run_single(s, cli)
    timeout_s = nil
  else
    run_ranks(s, cli, n)
  end
end

return M
