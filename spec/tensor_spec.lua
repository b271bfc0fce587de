-- spec/tensor_spec.lua: tensor construction, views, element access, storage release, printing.
local fsdp = require "fsdp"
local F = fsdp.F

describe("tensors", function()
  it("build from nested tables and read back", function()
    local t = fsdp.tensor({{1, 2, 3}, {4, 5, 6}})
    assert.same({2, 3}, t:shape())
    assert.same({{1, 2, 3}, {4, 5, 6}}, t:tolist())
    assert.equal("f32", t.dtype)
    assert.equal("cpu", t.device)
  end)

  it("keep exact i64 values", function()
    local t = fsdp.tensor({0, 2^40 + 1, -7}, {dtype = "i64"})
    assert.same({0, 2^40 + 1, -7}, t:tolist())
  end)

  it("transpose and narrow as views over the same storage", function()
    local t = fsdp.arange(12, {dtype = "f32"}):view(3, 4)
    local tt = t:transpose(1, 2)
    assert.same({4, 3}, tt:shape())
    assert.equal(t:get(1 * 4 + 2), tt:get(2 * 3 + 1))  -- t[1][2] == tt[2][1]
    local n = t:narrow(2, 2, 2)
    assert.same({{1, 2}, {5, 6}, {9, 10}}, n:tolist())
    assert.is_false(n:is_contiguous())
    assert.same({{1, 2}, {5, 6}, {9, 10}}, n:contiguous():tolist())
  end)

  it("round-trip bf16 and f16 to the nearest value", function()
    local x = fsdp.tensor({1.0, 1.00390625, 3.14159, -2.5e-3, 65504})
    local b = x:to("bf16"):to("f32"):tolist()
    assert.same({1.0, 1.0, 3.140625, -164 / 65536, 65536}, b)  -- nearest bf16 values, exact
    local h = x:to("f16"):to("f32"):tolist()
    assert.equal(1.0, h[1]); assert.equal(1.00390625, h[2]); assert.equal(65504, h[5])
    assert.is_true(math.abs(h[3] - 3.140625) < 1e-6)
  end)

  it("release storage and re-allocate it under live views", function()
    local t = fsdp.ones({4, 4})
    local v = t:narrow(1, 2, 2)
    assert.is_true(v:has_data())
    fsdp.C.fl_tensor_storage_release(t._p)
    assert.is_false(v:has_data())
    assert.has_error(function() return v:sum() end)
    fsdp.C.fl_tensor_storage_alloc(t._p)
    t:fill_(2)
    assert.equal(16, v:sum():item())
  end)

  it("allocates nothing on meta until materialised", function()
    local before = fsdp.C.fl_mem_total_current()
    local t = fsdp.empty({1024, 1024}, {device = "meta"})
    assert.equal(before, fsdp.C.fl_mem_total_current())
    assert.equal("meta", t.device)
    assert.has_error(function() return t:sum() end, "sum: tensor [1024, 1024] is on meta (materialise it first)")
    fsdp.C.fl_tensor_materialize(t._p, 0)
    assert.equal("cpu", t.device)
    assert.equal(before + 4 * 1024 * 1024, fsdp.C.fl_mem_total_current())
  end)

  it("returns NaN as a number whatever its bit pattern (LuaJIT reads some NaN payloads as nil)", function()
    local t = fsdp.empty({4})
    require("ffi").fill(t:data_ptr(), 16, 0xff)   -- 0xffffffff: a NaN with a full payload
    local a, b = t:get(0), fsdp.F.sum_squares(t)
    assert.equal("number", type(a)); assert.is_true(a ~= a)
    assert.equal("number", type(b)); assert.is_true(b ~= b)
  end)

  it("prints values as PyTorch does, then shape, dtype and device (spec/print_spec.lua has the rest)", function()
    -- PyTorch: tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) (ten elements are far below its summarising threshold)
    assert.equal("tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], shape=[10], dtype=i64, device=cpu)",
                 tostring(fsdp.arange(10, {dtype = "i64"})))
  end)

  it("names the operation and shapes in errors", function()
    local a, b = fsdp.ones({2, 3}), fsdp.ones({4, 5})
    local ok, err = pcall(function() return a + b end)
    assert.is_false(ok)
    assert.matches("add: shapes %[2, 3%] and %[4, 5%] do not broadcast", err)
    ok, err = pcall(function() return F.matmul(a, b) end)
    assert.matches("matmul: shapes %[2, 3%] and %[4, 5%] do not align", err)
    ok, err = pcall(function() return fsdp.zeros({2}, {dtype = "f8"}) end)
    assert.matches("unknown dtype 'f8'", err)
    ok, err = pcall(function() return fsdp.zeros({2}, {dtyp = "f32"}) end)
    assert.matches("unknown option 'dtyp'", err)
  end)
end)

describe("counter-based RNG", function()
  it("gives rows 5..9 of a named parameter alone exactly as the full initialisation", function()
    local C = fsdp.C
    local full = fsdp.empty({16, 7})
    C.fl_tensor_normal_(full._p, 1234, "model.layers.0.mlp.up_proj.weight", 0, 0, 0.02)
    local part = fsdp.empty({5, 7})
    C.fl_tensor_normal_(part._p, 1234, "model.layers.0.mlp.up_proj.weight", 4 * 7, 0, 0.02)
    local rows = full:narrow(1, 5, 5):contiguous()
    assert.same(rows:totable(), part:totable())   -- bitwise: same floats
    -- a different name is a different stream
    local other = fsdp.empty({16, 7})
    C.fl_tensor_normal_(other._p, 1234, "model.layers.1.mlp.up_proj.weight", 0, 0, 0.02)
    assert.are_not.same(full:totable(), other:totable())
  end)

  it("draws normals with the requested mean and std", function()
    local t = fsdp.randn({200000}, {seed = 7, std = 2, mean = 1})
    local m = t:mean():item()
    local v = ((t - m) * (t - m)):mean():item()
    assert.is_true(math.abs(m - 1) < 0.02, "mean " .. m)          -- 4 sigma of the sample mean is 0.018
    assert.is_true(math.abs(math.sqrt(v) - 2) < 0.02, "std " .. math.sqrt(v))
  end)
end)
