-- spec/support/dist.lua: runs a worker script on N real ranks (`build/fsdp-lua -n N worker dir args...`) under a
-- wall-clock limit, and reads back what each rank wrote. Every multi-rank spec uses it; workers use it too.
--
-- In a spec:
--   local D = require "dist"
--   local res = D.run(2, "spec/workers/comm_worker.lua", {"x"}, {timeout = 30})
--   assert.equal(0, res.code, res.output)
--   local ranks = D.results(res)          -- ranks[1] is rank 0's table, ranks[2] rank 1's, ...
-- In the worker (arg[1] is always the result directory; the caller's args follow):
--   local D = require "dist"
--   D.write(arg[1], fsdp.rank(), {loss = 1.25, sizes = {3, 4}})
--
-- Values written are Lua data (numbers to 17 significant digits, so f64 round-trips bit-exactly; strings;
-- booleans; nested tables; nan and infinities). A run never hangs the suite: after `timeout` seconds the launcher
-- is killed and res.timed_out is true.
local M = {}

M.root = (debug.getinfo(1, "S").source:match("^@(.*)spec/support/dist%.lua$") or "")
if M.root == "" then M.root = "./" end
-- FSDP_BUILD (set by spec/run.sh) picks the build under test, e.g. build-asan for make check-asan.
M.build = os.getenv("FSDP_BUILD") or "build"
M.exe = M.root .. M.build .. "/fsdp-lua"

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
M.quote = q

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end
M.read_file = read_file

-- A fresh, empty directory.
function M.tmpdir()
  local p = os.tmpname()
  os.remove(p)
  os.execute("mkdir -p " .. q(p))
  return p
end

local function now()
  local p = io.popen("date +%s.%N")
  local s = p:read("*l")
  p:close()
  return tonumber(s) or os.time()
end

local RUN_OPTS = {timeout = true, env = true, dir = true, launcher_args = true, no_dir = true}

-- run(n, worker, args, {timeout = 60, env = {NAME = value | false}, dir = <result dir>, launcher_args = {...},
--     no_dir = true})  -- no_dir: do not pass the result dir as the first argument (a plain script, not a worker)
-- Runs `fsdp-lua -n n [launcher_args] worker dir args...` from the repository root. OMP_NUM_THREADS is unset unless
-- env sets it (the launcher then splits the cores between the ranks); env NAME = false unsets NAME. Returns
-- {code, timed_out, stdout, stderr, output = stdout .. stderr, dir, elapsed}.
function M.run(n, worker, args, opts)
  opts = opts or {}
  for k in pairs(opts) do
    if not RUN_OPTS[k] then error("dist.run: unknown option '" .. tostring(k) .. "'", 2) end
  end
  local dir = opts.dir or M.tmpdir()
  os.execute("mkdir -p " .. q(dir))
  -- env's options (-u) must come before its assignments
  local unset, set = {"-u OMP_NUM_THREADS"}, {}
  -- Under make check-asan, spec/run.sh preloads libasan for busted's luajit only: the fsdp-lua ranks link it
  -- themselves, and mpirun must not inherit it, as Open MPI's own launcher then reports a heap-use-after-free of
  -- its own (orte_rml_oob_send_buffer_nb after pmix_server_log, when a rank exits non-zero).
  if (os.getenv("FSDP_SANITIZE") or "") ~= "" then unset[#unset + 1] = "-u LD_PRELOAD" end
  local lua_path = M.root .. "lua/?.lua;" .. M.root .. "lua/?/init.lua;" .. M.root .. "spec/support/?.lua;;"
  set[1] = "LUA_PATH=" .. q(lua_path)
  for k, v in pairs(opts.env or {}) do
    if v == false then unset[#unset + 1] = "-u " .. k else set[#set + 1] = k .. "=" .. q(v) end
  end
  local env = {"env", table.concat(unset, " "), table.concat(set, " ")}
  local parts = {}
  for _, a in ipairs(args or {}) do parts[#parts + 1] = q(a) end
  local timeout = opts.timeout or 60
  local out, err, rcf = dir .. "/.stdout", dir .. "/.stderr", dir .. "/.rc"
  local cmd = ("cd %s && %s timeout -k 5 %d %s -n %d %s %s %s %s > %s 2> %s < /dev/null; echo $? > %s")
    :format(q(M.root), table.concat(env, " "), timeout, q(M.exe), n, table.concat(opts.launcher_args or {}, " "),
            q(worker), opts.no_dir and "" or q(dir), table.concat(parts, " "), q(out), q(err), q(rcf))
  local t0 = now()
  os.execute(cmd)
  local elapsed = now() - t0
  local code = tonumber((read_file(rcf) or ""):match("%d+")) or -1
  local so, se = read_file(out) or "", read_file(err) or ""
  return {code = code, timed_out = code == 124 or code == 137, stdout = so, stderr = se, output = so .. se,
          dir = dir, elapsed = elapsed}
end

-- ---- result files ----

local function ser(v, out, depth)
  local t = type(v)
  if t == "number" then
    if v ~= v then out[#out + 1] = "0/0"
    elseif v == math.huge then out[#out + 1] = "1/0"
    elseif v == -math.huge then out[#out + 1] = "-1/0"
    else out[#out + 1] = ("%.17g"):format(v) end
  elseif t == "string" then out[#out + 1] = ("%q"):format(v)
  elseif t == "boolean" or t == "nil" then out[#out + 1] = tostring(v)
  elseif t == "table" then
    if depth > 32 then error("dist.write: nesting deeper than 32 (a cycle?)", 3) end
    out[#out + 1] = "{"
    local n = #v
    for i = 1, n do ser(v[i], out, depth + 1); out[#out + 1] = "," end
    for k, x in pairs(v) do
      local array_key = type(k) == "number" and k >= 1 and k <= n and k == math.floor(k)
      if not array_key then
        out[#out + 1] = "["
        ser(k, out, depth + 1)
        out[#out + 1] = "]="
        ser(x, out, depth + 1)
        out[#out + 1] = ","
      end
    end
    out[#out + 1] = "}"
  else
    error("dist.write: cannot write a " .. t, 3)
  end
end

function M.serialize(v)
  local out = {}
  ser(v, out, 0)
  return table.concat(out)
end

function M.deserialize(s, name)
  if not s:match("^%s*return[%s{]") then s = "return " .. s end
  local f, e = loadstring(s, name)
  if not f then return nil, e end
  setfenv(f, {})
  local ok, v = pcall(f)
  if not ok then return nil, v end
  return v
end

-- Worker side: writes `value` as rank `rank`'s result, dir/rank<R>.lua, a chunk `return <value>` (dofile reads
-- it too), atomically: a reader never sees half a file.
function M.write(dir, rank, value)
  local path = ("%s/rank%d.lua"):format(dir, rank)
  local f = assert(io.open(path .. ".tmp", "wb"))
  f:write("return ", M.serialize(value), "\n")
  f:close()
  assert(os.rename(path .. ".tmp", path))
end

-- Spec side: rank's table, or nil and a reason.
function M.result(dir, rank)
  local path = ("%s/rank%d.lua"):format(dir, rank)
  local s = read_file(path)
  if not s then return nil, "rank " .. rank .. " wrote no result (" .. path .. ")" end
  return M.deserialize(s, "=" .. path)
end

-- All n ranks' tables (index r + 1 for rank r); n defaults to the files present. Raises when one is missing,
-- quoting the run's output when given a run result.
function M.results(res_or_dir, n)
  local dir = type(res_or_dir) == "table" and res_or_dir.dir or res_or_dir
  if not n then
    n = 0
    while read_file(("%s/rank%d.lua"):format(dir, n)) do n = n + 1 end
  end
  local all = {}
  for r = 0, n - 1 do
    local v, e = M.result(dir, r)
    if v == nil then
      local extra = type(res_or_dir) == "table" and ("\nexit " .. res_or_dir.code .. ", output:\n" .. res_or_dir.output) or ""
      error(e .. extra, 2)
    end
    all[r + 1] = v
  end
  return all
end

-- Removes a run's directory.
function M.cleanup(res_or_dir)
  local dir = type(res_or_dir) == "table" and res_or_dir.dir or res_or_dir
  if dir and dir:match("^/tmp/") then os.execute("rm -rf " .. q(dir)) end
end

return M
