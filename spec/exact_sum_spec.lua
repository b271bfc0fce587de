-- spec/exact_sum_spec.lua: the exact sum of squares behind the gradient norm (engine/core/exact_sum.c). Its value is
-- checked against a double-double sum computed here (error-free products and sums, ~106 bits: far finer than
-- one rounding to f64 for these data), and against hand-made cases where the correctly rounded result is known
-- and a plain f64 sum gets it wrong; then the property the norm relies on: any split of the terms, in any order,
-- merged in any order, gives the same bits.
local ffi  = require "ffi"
local fsdp = require "fsdp"
local F    = fsdp.F
local C    = require("fsdp.core").C

local function acc_new() return fsdp.zeros({C.FL_EXACT_SUM_SIZE}, {dtype = "i64"}) end
local function add(acc, t) assert.equal(0, C.fl_exact_sum_add_squares(acc._p, t._p)) end
local function value(acc) return tonumber(C.fl_exact_sum_value(acc._p)) end

-- Dekker's two-product and Knuth's two-sum: the sum of squares as hi + lo with ~106 bits.
local function two_sum(a, b) local s = a + b; local bb = s - a; return s, (a - (s - bb)) + (b - bb) end
local function two_prod(a, b)
  local p = a * b
  local function split(x) local c = 134217729 * x; local h = c - (c - x); return h, x - h end
  local ah, al = split(a); local bh, bl = split(b)
  return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl
end
local function dd_sum_squares(t)
  local x = t:to("f64")
  local p = x:data_ptr("double *")
  local hi, lo = 0, 0
  for i = 0, x:numel() - 1 do
    local sq, sqe = two_prod(p[i], p[i])
    local s, e = two_sum(hi, sq)
    e = e + lo + sqe
    hi, lo = two_sum(s, e)
  end
  return hi + lo
end

describe("exact sum of squares", function()
  it("equals a double-double sum for f32, bf16, f16 and f64 data of mixed magnitudes", function()
    for _, dt in ipairs {"f32", "bf16", "f16", "f64"} do
      local base = fsdp.randn({3000, 7}, {seed = 5})
      local scale = fsdp.randn({3000, 1}, {seed = 6}):mul(6):exp()    -- magnitudes spread over ~1e-8 .. 1e8
      local x = base:mul(scale):to(dt)
      if dt == "f16" then x = base:to(dt) end                          -- f16 overflows past 65504
      assert.equal(dd_sum_squares(x), F.sum_squares(x), dt)
    end
  end)

  it("rounds once, to nearest even, where a plain f64 sum does not", function()
    local t = 2 ^ -27                                -- t^2 = 2^-54: a quarter of the ulp of 1
    local function ss(v, dt) return F.sum_squares(fsdp.tensor(v, {dtype = dt or "f32"})) end
    assert.equal(1, ss {1, t, t})                    -- 1 + 2^-53: a tie, to even
    assert.equal(1 + 2 ^ -52, ss {1, t, t, t})       -- 1 + 1.5 * 2^-53: up (a plain sum gives 1)
    assert.equal(1 + 2 ^ -52, ss {t, t, t, 1})       -- in any order
    assert.equal(1 + 2 ^ -52, ss({1, t, t, 2 ^ -60}, "f64"))  -- a tie broken by a tiny sticky bit
    assert.equal(0, ss {0, 0})
    assert.equal(0, ss {})                           -- empty: 0, as torch
    assert.equal(2 ^ -298, ss {2 ^ -149})            -- the f32 subnormal squared is exact in the accumulator
    assert.equal(2 ^ -1074, ss({2 ^ -537, 2 ^ -537}, "f64") / 2)  -- subnormal f64 results keep their bits
    assert.equal(0, ss({2 ^ -600}, "f64"))           -- below half the smallest subnormal
    assert.equal(math.huge, ss({1e200, 1e200}, "f64"))
  end)

  it("propagates NaN and Inf as a sum would", function()
    local nan = F.sum_squares(fsdp.tensor({1, 0 / 0, 1 / 0}))
    assert.is_true(nan ~= nan)
    assert.equal(math.huge, F.sum_squares(fsdp.tensor({1, -1 / 0})))
    assert.equal(math.huge, F.sum_squares(fsdp.tensor({1, 1 / 0}, {dtype = "bf16"})))
  end)

  it("gives the same bits for any split of the terms and any merge order", function()
    local x = fsdp.randn({5000}, {seed = 9}):mul(fsdp.randn({5000}, {seed = 10}):mul(4):exp())
    local whole = F.sum_squares(x)
    local cuts = {0, 1, 97, 1234, 1235, 4000, 5000}
    local parts = {}
    for i = 1, #cuts - 1 do
      local a = acc_new()
      add(a, x:narrow(1, cuts[i] + 1, cuts[i + 1] - cuts[i]))
      parts[i] = a
    end
    for _, order in ipairs {{1, 2, 3, 4, 5, 6}, {6, 5, 4, 3, 2, 1}, {3, 1, 6, 2, 5, 4}} do
      local total = acc_new()
      for _, i in ipairs(order) do assert.equal(0, C.fl_exact_sum_merge(total._p, parts[i]._p)) end
      assert.equal(whole, value(total))
    end
    -- strided views and many threads' partial sums: the same bits
    local m = x:view(50, 100)
    assert.equal(whole, F.sum_squares(m:transpose(1, 2)))
  end)

  it("rejects accumulators of the wrong dtype or size and non-float tensors", function()
    local bad = fsdp.zeros({3}, {dtype = "i64"})
    assert.is_true(C.fl_exact_sum_add_squares(bad._p, fsdp.ones({2})._p) < 0)
    assert.matches("accumulator must be a contiguous i64 tensor of 68 elements", ffi.string(C.fl_last_error()))
    assert.is_true(C.fl_exact_sum_add_squares(acc_new()._p, fsdp.ones({2}, {dtype = "i64"})._p) < 0)
    assert.matches("expected a floating%-point tensor, got i64", ffi.string(C.fl_last_error()))
  end)
end)
