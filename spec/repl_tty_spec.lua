-- spec/repl_tty_spec.lua: the REPL of one process on a terminal, typed at through a pseudo-terminal
-- (spec/support/pty.lua) as a user types: continuation lines, TAB completion, Ctrl-C in a running statement and
-- at a continuation prompt, history kept from one run to the next, Ctrl-D. Every run has a hard limit (the
-- process group is killed past it) and every read a deadline, so nothing here can hang. Two ranks:
-- spec/dist/repl_dist_spec.lua.
local D = require "dist"   -- spec/support/dist.lua: the executable under test, the repository root, tmpdir
local pty = require "pty"

local function start(opts)
  opts = opts or {}
  local argv = {D.exe}
  for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
  local p = pty.spawn(argv, {cwd = D.root, limit = opts.limit or 30,
                             env = {FSDP_LUA_HISTORY = opts.history or "", OMP_NUM_THREADS = "1"}})
  p:expect("Ctrl-C interrupts, Ctrl-D exits.")
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

local function quit(p)
  p:type("\4")
  local status = p:wait(10)
  p:close()
  return status
end

describe("the REPL on a terminal", function()
  it("answers expressions, continues an incomplete statement on a '>>' prompt, and Ctrl-C there drops it", function()
    local p = start()
    finally(function() p:close() end)
    assert.equal("", ask(p, "local a = 20"))
    assert.equal("42", ask(p, "a * 2 + 2"))
    p:type("local function f(n)\r")
    p:expect("\n>> ")
    p:type("  return n + 1\r")
    p:expect("\n>> ")
    assert.equal("", ask(p, "end"))
    assert.equal("42", ask(p, "f(41)"))
    p:type("for i = 1, 3 do\r")
    p:expect("\n>> ")
    p:type("\3")                                      -- Ctrl-C at the continuation prompt
    p:expect("\n> ")
    assert.equal("42", ask(p, "40 + 2"))              -- the half-typed loop is gone, not prepended
    local e = ask(p, "error('boom')")
    assert.truthy(e:find("stdin:1: boom", 1, true), e)
    assert.truthy(e:find("stack traceback", 1, true), e)
    assert.equal("alive", ask(p, "'alive'"))
    assert.equal(0, quit(p))                          -- Ctrl-D: a clean exit
  end)

  it("completes globals, fields of lazily loaded modules and methods found through metatables with TAB", function()
    local p = start()
    finally(function() p:close() end)
    p:type("fsdp.mo\t")
    p:expect("fsdp.models")
    local shown = ask(p, "")
    assert.truthy(shown:find("from_pretrained", 1, true), shown)   -- the completed line ran: the module's table
    assert.equal("", ask(p, "m = fsdp.nn.Linear.new(2, 3)"))
    -- named_children, named_modules, named_parameters live on Module, two classes up Linear's __index chain:
    -- TAB completes their common part, a second TAB lists them
    p:type("m:na\t")
    p:expect("m:named_")
    p:type("\t")
    p:expect("named_parameters")
    p:type("p\t")
    p:expect("m:named_parameters")
    local iter = ask(p, "()")                           -- the iterator over (name, tensor)
    assert.truthy(iter:find("^function: "), iter)
    p:type("m:num_p\t")
    p:expect("m:num_parameters")
    assert.equal("9", ask(p, "()"))                   -- 2 x 3 weights and 3 biases
    assert.equal("", ask(p, "t = fsdp.ones({2, 3})"))
    p:type("t:nume\t")                                -- a tensor's methods: Tensor.__completions
    p:expect("t:numel")
    assert.equal("6", ask(p, "()"))
    assert.equal(0, quit(p))
  end)

  it("stops a running Lua loop, a compiled loop of ops and a long backward on Ctrl-C, and goes on", function()
    local dir = D.tmpdir()
    -- spin's loop is compiled by LuaJIT (a script, not typed at the prompt): no debug hook runs inside a trace,
    -- and the request is taken at the entry of the next op ("interrupted (in add)"); should the loop be outside
    -- its trace just then, the hook stops it first. Either way it stops.
    local script = dir .. "/spin.lua"
    local f = assert(io.open(script, "w"))
    f:write("function spin(t) local s = t for _ = 1, 1e12 do s = s + t end return s end\n")
    f:close()
    local p = start{args = {"-i", script}}
    finally(function() p:close(); D.cleanup(dir) end)
    p:type("n = 0 while true do n = n + 1 end\r")
    p:expect("while true do n = n + 1 end\n")
    pty.sleep(0.3)
    p:send("\3")
    local e = p:expect("\n> ")
    assert.truthy(e:find("interrupted", 1, true), e)
    assert.equal("true", ask(p, "n > 0"))
    p:type("spin(fsdp.ones({4}))\r")
    p:expect("spin(fsdp.ones({4}))\n")
    pty.sleep(0.3)
    p:send("\3")
    e = p:expect("\n> ")
    assert.truthy(e:find("interrupted", 1, true), e)
    assert.truthy(e:find("spin.lua:1: in function 'spin'", 1, true), e)
    -- A backward through 3000 nodes whose gradients are 16 MB each runs several seconds in one C call: it
    -- stops between two nodes.
    ask(p, "big = fsdp.ones({4000000}, {requires_grad = true})")
    ask(p, "s = big:narrow(1, 1, 1):sum() for i = 2, 3000 do s = s + big:narrow(1, i, 1):sum() end", 20)
    p:type("s:backward()\r")
    p:expect("s:backward()\n")
    pty.sleep(0.5)
    local t0 = pty.now()
    p:send("\3")
    e = p:expect("\n> ", 20)
    assert.truthy(e:find("interrupted (in backward, before node ", 1, true), e)
    assert.is_true(pty.now() - t0 < 3, ("the interrupt took %.1f s"):format(pty.now() - t0))
    assert.equal("2", ask(p, "1 + 1"))
    assert.equal(0, quit(p))
  end)

  it("keeps the history in its file from one run to the next", function()
    local dir = D.tmpdir()
    local hist = dir .. "/history"
    finally(function() D.cleanup(dir) end)
    local p = start{history = hist}
    ask(p, "hist_value = 41")
    assert.equal("42", ask(p, "hist_value + 1"))
    -- written as it goes: the file has both lines before the REPL ends (libedit writes a space as \040)
    local text = D.read_file(hist) or ""
    assert.truthy(text:find("hist_value\\040=\\04041", 1, true), text)
    assert.equal(0, quit(p))
    p = start{history = hist}
    finally(function() p:close() end)
    p:type("\27[A")                                   -- Up: the last line of the previous run
    p:expect_line("> hist_value + 1")
    p:type("\27[A")
    p:expect_line("> hist_value = 41")
    assert.equal("", ask(p, ""))                       -- runs the recalled line
    assert.equal("42", ask(p, "hist_value + 1"))
    assert.equal(0, quit(p))
  end)
end)
