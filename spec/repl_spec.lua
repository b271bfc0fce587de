-- spec/repl_spec.lua: the REPL's logic (fsdp.repl), driven line by line as engine/cli/main.c drives it.
-- Each test uses its own session with captured output, so nothing reaches the terminal.
local repl = require "fsdp.repl"

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
end)
