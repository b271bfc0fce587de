-- spec/cli_spec.lua: the fsdp-lua executable (engine/cli/main.c) run as a user runs it: options, scripts with
-- arguments, exit codes, error tracebacks and the REPL fed through a pipe.
local root = (debug.getinfo(1, "S").source:match("^@(.*)spec/cli_spec%.lua$") or "")
if root == "" then root = "./" end
local exe = root .. (os.getenv("FSDP_BUILD") or "build") .. "/fsdp-lua"  -- FSDP_BUILD: see spec/run.sh

-- Runs a shell command line; returns its stdout+stderr and its exit status. HOME points at a scratch dir so
-- the REPL's history file never lands in the user's home.
local tmp = os.tmpname()
os.remove(tmp)
os.execute("mkdir -p " .. tmp)
local function sh(cmd)
  local p = io.popen("HOME=" .. tmp .. " " .. cmd .. " 2>&1; echo \"rc=$?\"")
  local s = p:read("*a")
  p:close()
  local body, rc = s:match("^(.*)rc=(%d+)\n$")
  return body, tonumber(rc)
end

local function write(name, text)
  local path = tmp .. "/" .. name
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

describe("fsdp-lua", function()
  teardown(function() os.execute("rm -rf " .. tmp) end)

  it("prints usage with --help and -h and exits 0", function()
    for _, flag in ipairs {"--help", "-h"} do
      local out, rc = sh(exe .. " " .. flag)
      assert.equal(0, rc)
      assert.truthy(out:find("usage: fsdp-lua", 1, true), out)
      assert.truthy(out:find("-e STMT", 1, true), out)
    end
  end)

  it("prints the engine's version with --version", function()
    local out, rc = sh(exe .. " --version")
    assert.equal(0, rc)
    -- the same string the library reports through the FFI: two code paths to one fl_version()
    assert.equal("fsdp-lua " .. require("fsdp").version() .. " (LuaJIT, OpenBLAS)\n", out)
  end)

  it("runs a script with its arguments in arg and ...", function()
    local script = write("args.lua", [[
local fsdp = require "fsdp"
print(arg[0], arg[1], arg[2], #arg, select("#", ...), ...)
print(fsdp.ones({2, 2}):sum():item())
]])
    local out, rc = sh(exe .. " " .. script .. " alpha 'two words'")
    assert.equal(0, rc)
    assert.equal(script .. "\talpha\ttwo words\t2\t2\talpha\ttwo words\n4\n", out)
  end)

  it("starts OpenMP with OMP_WAIT_POLICY=passive unless the user set it, in one process and in every rank", function()
    -- libgomp reads the variable when it loads, so the value a script sees is the one its threads run with
    local show = " -e 'print(os.getenv(\"OMP_WAIT_POLICY\"))'"
    local out, rc = sh("env -u OMP_WAIT_POLICY " .. exe .. show)
    assert.equal(0, rc)
    assert.equal("passive\n", out)
    out, rc = sh("OMP_WAIT_POLICY=active " .. exe .. show)
    assert.equal(0, rc)
    assert.equal("active\n", out)
    out, rc = sh("env -u OMP_WAIT_POLICY " .. exe .. " -n 2" .. show)
    assert.equal(0, rc)
    assert.equal("passive\npassive\n", out)
  end)

  it("runs -e statements in order before the script", function()
    local script = write("after.lua", "print('script sees', x)\n")
    local out, rc = sh(exe .. " -e 'x = 1' -e 'x = x + 41; print(x)' " .. script)
    assert.equal(0, rc)
    assert.equal("42\nscript sees\t42\n", out)
  end)

  it("exits non-zero with the message and a traceback when a script fails", function()
    local script = write("fail.lua", "local function inner() error('it broke') end\ninner()\n")
    local out, rc = sh(exe .. " " .. script)
    assert.equal(1, rc)
    assert.truthy(out:find("fail.lua:1: it broke", 1, true), out)
    assert.truthy(out:find("stack traceback", 1, true), out)
    assert.truthy(out:find("in function 'inner'", 1, true) or out:find("fail.lua:2", 1, true), out)
    out, rc = sh(exe .. " " .. tmp .. "/missing.lua")
    assert.equal(1, rc)
    assert.truthy(out:find("missing.lua", 1, true), out)
    out, rc = sh(exe .. " -e 'error(\"from -e\")'")
    assert.equal(1, rc)
    assert.truthy(out:find("from -e", 1, true), out)
  end)

  it("rejects an unknown option with exit status 2 and the usage", function()
    local out, rc = sh(exe .. " --frobnicate")
    assert.equal(2, rc)
    assert.truthy(out:find("unknown option '--frobnicate'", 1, true), out)
    assert.truthy(out:find("usage:", 1, true), out)
    out, rc = sh(exe .. " -e")
    assert.equal(2, rc)
    assert.truthy(out:find("-e needs a statement", 1, true), out)
  end)

  it("reads REPL lines from a pipe: expressions, locals, continuation lines, errors", function()
    local input = write("repl.txt", table.concat({
      "1 + 1", "local t = fsdp.ones({3})", "t:sum():item()",
      "local function f(n)", "  return n * 10", "end", "f(4)",
      "error('oops')", "'still alive'", ""}, "\n"))
    local out, rc = sh(exe .. " -i < " .. input)
    assert.equal(0, rc)
    -- With stdin not a terminal libedit prints no prompts: only the banner, results and the error.
    assert.truthy(out:find("^fsdp%-lua [^\n]*Ctrl%-D exits%.\n"), out)
    assert.truthy(out:find("\n2\n3\n40\n", 1, true), out)
    assert.truthy(out:find("stdin:1: oops", 1, true), out)
    assert.truthy(out:find("still alive", 1, true), out)
    -- a script's globals are visible in the REPL that follows it (-i)
    local script = write("setup.lua", "answer = 6 * 7\n")
    local input2 = write("repl2.txt", "answer\n")
    out, rc = sh(exe .. " -i " .. script .. " < " .. input2)
    assert.equal(0, rc)
    assert.truthy(out:find("\n42\n", 1, true), out)
  end)
end)
