-- spec/dist/repl_dist_spec.lua: the REPL on two ranks (fsdp-lua -n 2 -i), typed at through a pseudo-terminal as
-- a user types: rank 0 reads each line, every rank runs it, rank 0 prints the answers grouped; errors of some
-- ranks; a collective only some ranks enter, which ends with the engine's timeout message and leaves the groups
-- usable (fl_comm_resync); Ctrl-C on every rank; Ctrl-D. One session serves the tests of a describe, in order
-- (starting two ranks is the slow part); each test checks that the prompt came back. Every read has a deadline
-- and the session a hard limit, past which its processes are killed.
local D = require "dist"   -- spec/support/dist.lua: the executable under test, the repository root
local pty = require "pty"

-- The collective timeout of these sessions: what a collective only some ranks enter costs.
local TIMEOUT = 1

local function start()
  local p = pty.spawn({D.exe, "-n", "2", "-i"}, {cwd = D.root, limit = 60,
    env = {FSDP_LUA_HISTORY = "", FSDP_REPL_TIMEOUT = tostring(TIMEOUT), OMP_NUM_THREADS = "1"}})
  p:expect("on 2 ranks: every rank runs each line. Ctrl-C interrupts, Ctrl-D exits.", 30)
  p:expect("> ")
  return p
end

-- Types a line at the prompt; returns what the REPL printed for it, up to the next prompt (echo and prompt
-- removed).
local function ask(p, line, timeout)
  p:type(line .. "\r")
  local body = p:expect("\n> ", timeout):sub(1, -4)
  local nl = body:find("\n", 1, true)
  return nl and body:sub(nl + 1) or ""
end

describe("the REPL on two ranks", function()
  local p
  setup(function() p = start() end)
  teardown(function() if p then p:close() end end)

  it("shows an answer all ranks agree on once, and differing answers once per rank with the rank", function()
    assert.equal("2", ask(p, "fsdp.world_size()"))
    assert.equal("[rank 0] 0\n[rank 1] 1", ask(p, "fsdp.rank()"))
    assert.equal("[rank 0] even\n[rank 1] odd", ask(p, "fsdp.rank() % 2 == 0 and 'even' or 'odd'"))
    -- a statement over several lines: rank 0 collects it, then every rank runs it
    p:type("local function twice(x)\r")
    p:expect("\n>> ")
    assert.equal("", ask(p, "return 2 * x end"))
    assert.equal("[rank 0] 0\n[rank 1] 2", ask(p, "twice(fsdp.rank())"))
    -- top-level locals persist on every rank
    assert.equal("", ask(p, "local base = 10 * fsdp.rank()"))
    assert.equal("[rank 0] 0\n[rank 1] 10", ask(p, "base"))
  end)

  it("shows what each rank printed, prefixed with the ranks that printed it", function()
    assert.equal("[rank 0] hello from 0\n[rank 1] hello from 1", ask(p, "print('hello from ' .. fsdp.rank())"))
    assert.equal("[rank 0,1] same", ask(p, "print('same')"))
    assert.equal("[rank 0,1] a\n[rank 0,1] b\n7", ask(p, "io.write('a\\nb\\n') return 7"))
  end)

  it("shows the errors of the ranks that failed, with their rank, and the others' answers", function()
    local shown = ask(p, "if fsdp.rank() == 1 then error('only on 1') end return 'fine'")
    assert.truthy(shown:find("[rank 0] fine", 1, true), shown)
    assert.truthy(shown:find("[rank 1] stdin:1: only on 1", 1, true), shown)
    assert.truthy(shown:find("[rank 1] stack traceback:", 1, true), shown)
    shown = ask(p, "error('everywhere')")                  -- the same error on every rank: once, bare
    assert.truthy(shown:find("^stdin:1: everywhere"), shown)
    assert.falsy(shown:find("[rank", 1, true), shown)
    assert.truthy(ask(p, "x = = 1"):find("unexpected symbol", 1, true))   -- rank 0 sees a syntax error alone
    assert.equal("still here", ask(p, "'still here'"))
  end)

  it("ends a collective only some ranks enter with the timeout message, and the next collectives match", function()
    local t0 = pty.now()
    local shown = ask(p, "if fsdp.rank() == 0 then fsdp.barrier() end", 20)
    assert.truthy(shown:find(("[rank 0] stdin:1: fsdp: barrier on group 'world' did not complete after %g s")
      :format(TIMEOUT), 1, true), shown)
    assert.is_true(pty.now() - t0 < TIMEOUT + 5, ("took %.1f s"):format(pty.now() - t0))
    assert.equal("6", ask(p, "t = fsdp.ones({3}); fsdp.dist.all_reduce(t); return t:sum():item()"))
    -- on a group split from the world, rank 1 ahead by two (one of them async): rank 0 owes two
    assert.equal("", ask(p, "g = fsdp.dist.world():split(0, fsdp.rank(), 'g')"))
    shown = ask(p, "if fsdp.rank() == 1 then g:barrier({async = true}); g:barrier() end", 20)
    assert.truthy(shown:find("[rank 1] stdin:1: fsdp: barrier on group 'g' did not complete", 1, true), shown)
    assert.equal("12", ask(p, "g:all_reduce(t); return t:sum():item()"))
    assert.equal("12", ask(p, "fsdp.dist.all_reduce(t, {op = 'avg'}); return t:sum():item()"))
  end)

  it("interrupts every rank on Ctrl-C, in a Lua loop and in a loop of collectives, and goes on", function()
    p:type("while true do end\r")
    p:expect("while true do end\n")
    pty.sleep(0.3)
    p:send("\3")
    local shown = p:expect("\n> ", 20)
    assert.truthy(shown:find("interrupted", 1, true), shown)
    assert.equal("[rank 0] 0\n[rank 1] 1", ask(p, "fsdp.rank()"))
    -- the ranks stop at different collectives: the groups are put back in step after the statement
    p:type("n = 0 while true do fsdp.dist.all_reduce(t); n = n + 1 end\r")
    p:expect("n = n + 1 end\n")
    pty.sleep(0.5)
    p:send("\3")
    shown = p:expect("\n> ", 20)
    assert.truthy(shown:find("interrupted", 1, true), shown)
    assert.equal("true", ask(p, "n > 0"))
    assert.equal("in step", ask(p, "fsdp.dist.all_reduce(t); fsdp.barrier(); return 'in step'"))
  end)

  it("cancels a half-typed line on Ctrl-C at the prompt, without interrupting the next statement", function()
    p:type("partial = (")
    p:type("\3")
    p:expect("\n> ")
    assert.equal("[rank 0] 0\n[rank 1] 1", ask(p, "fsdp.rank()"))
  end)

  it("completes with TAB on rank 0, and fsdp.repl_timeout sets the timeout on every rank", function()
    p:type("fsdp.world_s\t")
    p:expect("fsdp.world_size")
    assert.equal("2", ask(p, "()"))
    assert.equal("3", ask(p, "fsdp.repl_timeout(3)"))
    assert.equal("3", ask(p, "g:timeout()"))
    assert.equal(tostring(TIMEOUT), ask(p, "fsdp.repl_timeout(" .. TIMEOUT .. ")"))
  end)

  it("ends every rank with status 0 on Ctrl-D", function()
    p:type("\4")
    assert.equal(0, p:wait(20))
  end)
end)

describe("the REPL on two ranks, lines from a pipe", function()
  it("runs every line on every rank and prints the answers grouped, with no prompts", function()
    local dir = D.tmpdir()
    local input = dir .. "/input.txt"
    local f = assert(io.open(input, "w"))
    f:write("fsdp.rank()\nprint('p' .. fsdp.rank())\nfsdp.world_size()\n")
    f:close()
    local p = io.popen(("cd %s && env -u OMP_NUM_THREADS FSDP_LUA_HISTORY= timeout -k 5 30 %s -n 2 -i < %s 2>&1; "
                        .. "echo rc=$?"):format(D.quote(D.root), D.quote(D.exe), D.quote(input)))
    local out = p:read("*a")
    p:close()
    D.cleanup(dir)
    assert.truthy(out:find("rc=0\n", 1, true), out)
    assert.truthy(out:find("\n[rank 0] 0\n[rank 1] 1\n[rank 0] p0\n[rank 1] p1\n2\n", 1, true), out)
  end)
end)
