-- spec/repl_spec.lua: the REPL's logic (fsdp.repl), driven line by line as engine/cli/main.c drives it: statements,
-- TAB completion, the grouped output of several ranks, and the engine's interrupt request that Ctrl-C sets.
-- Each test uses its own session with captured output, so nothing reaches the terminal. The REPL on a terminal is
-- spec/repl_tty_spec.lua's, on two ranks spec/dist/repl_dist_spec.lua's.
local repl = require "fsdp.repl"
local fsdp = require "fsdp"

local function session()
  local out, err = {}, {}
  local s = repl.new{out = function(x) out[#out + 1] = x end, err = function(x) err[#err + 1] = x end}
  local function feed(...)
    local more
    for _, line in ipairs {...} do more = s:feed(line) end
    return more
  end
  local function take(t) local r = table.concat(t); for i = #t, 1, -1 do t[i] = nil end; return r end
  return feed, function() return take(out) end, function() return take(err) end, s
end

describe("repl", function()
  it("prints the value of an expression, every value of a multiple return", function()
    local feed, out = session()
    assert.is_false(feed("1 + 1"))
    assert.equal("2\n", out())
    feed("math.max(3, 9), 'x', nil")
    assert.equal("9\tx\tnil\n", out())
    feed("return nil")
    assert.equal("nil\n", out())
    feed("y = 4")                          -- a statement prints nothing
    assert.equal("", out())
  end)

  it("keeps top-level locals between lines but not locals inside blocks", function()
    local feed, out, err, s = session()
    feed("local a, b = 2, 5", "a * b")
    assert.equal("10\n", out())
    feed("do local hidden = 1 end", "hidden")
    assert.equal("nil\n", out())
    feed("local function sq(v) local inner = v * v return inner end", "sq(a + b), inner")
    assert.equal("49\tnil\n", out())
    assert.equal("", err())
    assert.equal(10, s.env.a * s.env.b)
  end)

  it("asks for more lines until a statement is complete", function()
    local feed, out, err = session()
    assert.is_true(feed("local function fact(n)"))
    assert.is_true(feed("  if n <= 1 then return 1 end"))
    assert.is_true(feed("  return n * fact(n - 1)"))
    assert.is_false(feed("end"))
    assert.is_false(feed("fact(10)"))
    assert.equal("3628800\n", out())
    assert.is_true(feed("local s = [[first"))          -- an open long string is incomplete too
    assert.is_false(feed("second]]"))
    feed("s")
    assert.equal("first\nsecond\n", out())
    assert.is_true(feed("{1,"))
    assert.is_false(feed("2}"))
    assert.equal("{1, 2}\n", out())
    assert.equal("", err())
  end)

  it("reports syntax and runtime errors and keeps going", function()
    local feed, out, err = session()
    assert.is_false(feed("x = = 1"))
    assert.truthy(err():find("unexpected symbol", 1, true))
    assert.is_false(feed("error('boom')"))
    local e = err()
    assert.truthy(e:find("stdin:1: boom", 1, true), e)
    assert.truthy(e:find("stack traceback", 1, true), e)
    assert.falsy(e:find("repl.lua", 1, true), e)           -- the REPL's own frames are cut
    assert.is_false(feed("fsdp.ones({2, 3}) + fsdp.ones({4})"))
    assert.truthy(err():find("[2, 3]", 1, true))          -- the engine's message names the shapes
    feed("40 + 2")
    assert.equal("42\n", out())
  end)

  it("preloads fsdp and pretty-prints tensors and tables", function()
    local feed, out = session()
    feed("local t = fsdp.tensor({{1, 2}, {3, 4}})", "t")
    assert.equal(tostring(require("fsdp").tensor({{1, 2}, {3, 4}})) .. "\n", out())
    feed("{3, 1, k = 'v', [10] = true}")
    assert.equal('{3, 1, [10] = true, k = "v"}\n', out())
    feed("{x = {y = {1}, z = {}}}")                   -- deeper tables elided, never shown by address
    assert.equal("{x = {y = {...}, z = {}}}\n", out())
    feed("=t:sum():item()")                              -- lua 5.1's "=expr" shorthand
    assert.equal("10\n", out())
  end)

  it("keeps sessions apart", function()
    local feed1, out1 = session()
    local feed2, out2 = session()
    feed1("local v = 1")
    feed2("local v = 2")
    feed1("v"); feed2("v")
    assert.equal("1\n", out1())
    assert.equal("2\n", out2())
  end)

  it("returns the statement's parts separately for the multi-rank loop: push, then run", function()
    local _, _, _, s = session()
    assert.equal("more", s:push("for i = 1, 2 do"))
    local kind, f, src = s:push("end")
    assert.equal("ready", kind)
    assert.equal("for i = 1, 2 do\nend", src)
    assert.is_false(s:run(f))                          -- a statement: no values
    f = select(2, s:push("=1, 'a'"))
    assert.equal("1\ta", s:run(f))
    local value, err = s:run(select(2, s:push("error('x')")))
    assert.is_nil(value)
    assert.truthy(err:find("stdin:1: x", 1, true), err)
    assert.equal("error", (s:push("x = = 2")))
    assert.equal("empty", (s:push("   ")))
  end)
end)

describe("repl completion", function()
  local env = setmetatable({fsdp = fsdp, answer = 42, _hidden = 1}, {__index = _G})
  local function complete(word) return repl.complete(env, word) end

  it("completes globals and keywords", function()
    assert.same({"answer"}, complete("ans"))
    assert.same({"fsdp"}, complete("fsd"))
    assert.same({"while"}, complete("whil"))
    assert.same({"print"}, complete("prin"))               -- through the environment's __index (_G)
    assert.same({"_hidden"}, complete("_hid"))             -- '_' names only when asked for
    assert.falsy(table.concat(complete("a"), " "):find("_hidden", 1, true))
  end)

  it("completes fields of tables, lazily loaded modules and nested tables", function()
    assert.same({"fsdp.models"}, complete("fsdp.mo"))       -- not loaded yet: fsdp's __completions lists it
    assert.same({"fsdp.nn.Linear"}, complete("fsdp.nn.Li"))
    assert.same({"math.floor"}, complete("math.flo"))
    assert.same({}, complete("nosuch.fi"))
    assert.same({}, complete("answer.x"))                  -- a number has no fields
  end)

  it("completes methods through metatables and __index chains, functions only after ':'", function()
    env.m = fsdp.nn.Linear.new(2, 3)
    -- named_* live on Module, two classes up Linear's chain
    assert.same({"m:named_children", "m:named_modules", "m:named_parameters"}, complete("m:na"))
    assert.same({"m:num_parameters"}, complete("m:num_p"))
    assert.same({"m.in_features"}, complete("m.in_f"))      -- a field, with '.'
    assert.same({}, complete("m:in_f"))                     -- not a method
    env.t = fsdp.ones({2, 3})
    -- a tensor's __index is a function: Tensor.__completions lists its methods and properties
    assert.same({"t:numel"}, complete("t:nume"))
    assert.same({"t.dtype"}, complete("t.dtyp"))
  end)
end)

describe("repl output of several ranks", function()
  local function r(value, output, err) return {value = value, output = output or "", error = err} end

  it("names ranks compactly", function()
    assert.equal("0", repl.rank_list({0}))
    assert.equal("0,2", repl.rank_list({0, 2}))
    assert.equal("0-3,5", repl.rank_list({0, 1, 2, 3, 5}))
  end)

  it("shows an answer every rank agrees on once, bare", function()
    local shown = repl.format({r("2"), r("2"), r("2")}, 3)
    assert.same({out = "2\n", err = ""}, shown)
  end)

  it("shows differing answers once per group of ranks with equal answers", function()
    local shown = repl.format({r("0"), r("1"), r("0"), r("1")}, 4)
    assert.equal("[rank 0,2] 0\n[rank 1,3] 1\n", shown.out)
    -- a multi-line answer (a tensor) keeps the ranks on every line
    shown = repl.format({r("a\nb"), r("c")}, 2)
    assert.equal("[rank 0] a\n[rank 0] b\n[rank 1] c\n", shown.out)
  end)

  it("prefixes what ranks printed, grouped, before the answers", function()
    local shown = repl.format({r("7", "hi\n"), r("7", "hi\n"), r("7", "ho\n")}, 3)
    assert.equal("[rank 0,1] hi\n[rank 2] ho\n7\n", shown.out)
  end)

  it("shows the errors of some ranks with their rank, and the others' answers", function()
    local shown = repl.format({r("5"), r(false, "", "stdin:1: boom\nstack traceback:")}, 2)
    assert.equal("[rank 0] 5\n", shown.out)
    assert.equal("[rank 1] stdin:1: boom\n[rank 1] stack traceback:\n", shown.err)
    shown = repl.format({r(false, "", "e"), r(false, "", "e")}, 2)   -- the same error everywhere: once, bare
    assert.same({out = "", err = "e\n"}, shown)
    shown = repl.format({r(false), r(false)}, 2)                    -- statements: nothing at all
    assert.same({out = "", err = ""}, shown)
  end)

  it("refuses fsdp.repl_timeout outside a REPL", function()
    local ok, err = pcall(fsdp.repl_timeout, 3)
    assert.is_false(ok)
    assert.truthy(err:find("no REPL is running", 1, true), err)
  end)
end)

-- The request Ctrl-C sets (engine/core/interrupt.c), raised from Lua instead of a signal: a second code path to
-- what main.c's handler does.
describe("engine interrupts", function()
  local C = require("fsdp.core").C
  after_each(function() C.fl_interrupt_arm(false); C.fl_interrupt_clear() end)

  it("fail the next op at entry, once per request, and only while armed", function()
    local a = fsdp.ones({3})
    C.fl_interrupt_request()                     -- disarmed: stays pending, nothing fails
    assert.equal(6, (a + a):sum():item())
    C.fl_interrupt_arm(true)
    local ok, err = pcall(function() return a + a end)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("interrupted (in add)", 1, true), err)
    assert.equal(6, (a + a):sum():item())        -- taken: the next op runs
  end)

  it("stop a backward between autograd nodes, not inside one", function()
    local x = fsdp.ones({4}, {requires_grad = true})
    -- The request arrives while the checkpoint's node runs (its recomputation sets it): that node finishes, and
    -- the engine stops before the next one.
    local y = fsdp.autograd.checkpoint(function(a)
      local r = a * 2
      C.fl_interrupt_request()
      return r
    end, x)
    local z = (y * 3):sum()
    C.fl_interrupt_clear()                       -- the forward ran fn too
    C.fl_interrupt_arm(true)
    local ok, err = pcall(function() z:backward() end)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("interrupted (in backward, before node ", 1, true), err)
    -- a request pending when backward is called is taken at its entry, like any op's
    local w = (x * 3):sum()
    C.fl_interrupt_request()
    ok, err = pcall(function() w:backward() end)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("interrupted (in backward)", 1, true), err)
  end)
end)
