-- spec/tensor_index_spec.lua: t:get / t:set with one flat index or one index per dim (0-based), through the
-- strides of views, on every dtype, and the errors for a wrong count, range, type or a tensor without data.
-- Expected values come from the Lua tables the tensors were built from, not from the tensor's own reads.
local fsdp = require "fsdp"

local function err_of(f, ...)
  local ok, e = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return tostring(e)
end

local DATA = {{1, 2, 3, 4}, {5, 6, 7, 8}, {9, 10, 11, 12}}   -- [3, 4]

describe("t:get(i1, ..., iN)", function()
  it("reads element [i][j] of a 2-d tensor, 0-based, and one index stays the flat row-major one", function()
    local t = fsdp.tensor(DATA)
    for i = 0, 2 do
      for j = 0, 3 do
        assert.equal(DATA[i + 1][j + 1], t:get(i, j))
        assert.equal(DATA[i + 1][j + 1], t:get(i * 4 + j))
      end
    end
  end)

  it("reads through the strides of transposed, narrowed and permuted views", function()
    local t = fsdp.tensor(DATA)
    local tt = t:transpose(1, 2)                  -- [4, 3]: tt[j][i] = t[i][j]
    local n = t:narrow(2, 2, 2)                   -- [3, 2]: columns 1 and 2 (narrow's start is 1-based)
    assert.is_false(tt:is_contiguous()); assert.is_false(n:is_contiguous())
    for i = 0, 2 do
      for j = 0, 3 do assert.equal(DATA[i + 1][j + 1], tt:get(j, i)) end
      for j = 0, 1 do assert.equal(DATA[i + 1][j + 2], n:get(i, j)) end
    end
    -- [2, 3, 4] permuted to [4, 2, 3]: p[c][a][b] = x[a][b][c]
    local x3 = {}
    for a = 1, 2 do
      x3[a] = {}
      for b = 1, 3 do
        x3[a][b] = {}
        for c = 1, 4 do x3[a][b][c] = 100 * a + 10 * b + c end
      end
    end
    local p = fsdp.tensor(x3):permute(3, 1, 2)
    for a = 0, 1 do
      for b = 0, 2 do
        for c = 0, 3 do assert.equal(x3[a + 1][b + 1][c + 1], p:get(c, a, b)) end
      end
    end
  end)

  it("reads every dtype exactly (values each dtype holds)", function()
    local values = {
      f32 = {{0.5, -3.25}, {2 ^ 100, -7}}, f64 = {{0.1, -1e300}, {2 ^ -60, 3}},
      bf16 = {{1.5, -256}, {0.0078125, 3.140625}}, f16 = {{65504, -0.5}, {2 ^ -24, 1.0009765625}},
      i32 = {{2 ^ 31 - 1, -2 ^ 31}, {0, -5}}, i64 = {{2 ^ 40 + 1, -2 ^ 52}, {0, 7}},
      u8 = {{0, 255}, {17, 128}}, bool = {{1, 0}, {0, 1}},
    }
    for dt, v in pairs(values) do
      local t = fsdp.tensor(v, {dtype = dt})
      local tt = t:transpose(1, 2)
      for i = 0, 1 do
        for j = 0, 1 do
          assert.equal(v[i + 1][j + 1], t:get(i, j), dt)
          assert.equal(v[i + 1][j + 1], tt:get(j, i), dt .. " transposed")
        end
      end
    end
  end)

  it("reads a 0-d tensor with no index or flat index 0", function()
    local s = fsdp.tensor(4.5)
    assert.equal(4.5, s:get())
    assert.equal(4.5, s:get(0))
  end)
end)

describe("t:set(i1, ..., iN, v)", function()
  it("writes element [i][j] only, through a view's strides into its base", function()
    local t = fsdp.tensor(DATA)
    t:set(2, 1, -1)
    t:transpose(1, 2):set(3, 0, -2)               -- t[0][3]
    t:narrow(2, 2, 2):set(1, 1, -3)               -- t[1][2]
    t:set(5, -4)                                   -- flat 5 = t[1][1]
    local want = {{1, 2, 3, -2}, {5, -4, -3, 8}, {9, -1, 11, 12}}
    assert.same(want, t:tolist())
  end)

  it("converts to the dtype as torch does: integers truncate toward zero, booleans are 0/1", function()
    local i = fsdp.zeros({2, 2}, {dtype = "i32"})
    i:set(0, 1, 2.7); i:set(1, 0, -2.7); i:set(1, 1, true)
    assert.same({{0, 2}, {-2, 1}}, i:tolist())
    local b = fsdp.zeros({2}, {dtype = "bf16"})
    b:set(1, 1.00390625)                           -- halfway between bf16 1 and 1.0078125: ties to even, 1
    assert.same({0, 1}, b:tolist())
    local f = fsdp.zeros({2})
    f:set(0, 1 / 0); f:set(1, 0 / 0)               -- floats hold infinities and NaN, as in torch
    assert.equal(math.huge, f:get(0)); assert.is_true(f:get(1) ~= f:get(1))
  end)

  it("refuses a value the dtype cannot hold (torch: 'value cannot be converted ... without overflow')", function()
    local cases = {
      {"i32", 2 ^ 31, "set: value 2147483648 does not fit dtype i32 (range [-2^31, 2^31 - 1])"},
      {"i64", 2 ^ 63, "set: value 9.2233720368548e+18 does not fit dtype i64 (range [-2^63, 2^63 - 1])"},
      {"u8", -1, "set: value -1 does not fit dtype u8 (range [0, 255])"},
      {"u8", 256, "set: value 256 does not fit dtype u8 (range [0, 255])"},
      {"f16", 70000, "set: value 70000 does not fit dtype f16 (range [-65504, 65504])"},
      {"f32", 1e39, "set: value 1e+39 does not fit dtype f32 (range [-3.4028e+38, 3.4028e+38])"},
      {"i32", 0 / 0, "set: value nan cannot be stored in a i32 tensor"},
      {"i64", 1 / 0, "set: value inf cannot be stored in a i64 tensor"},
    }
    for _, c in ipairs(cases) do
      local t = fsdp.zeros({2}, {dtype = c[1]})
      assert.matches(c[3], err_of(function() return t:set(1, c[2]) end), 1, true)
      assert.same({0, 0}, t:tolist(), c[1] .. ": unchanged")
    end
  end)
end)

describe("get/set errors", function()
  local t = fsdp.zeros({2, 3})
  it("name the count of indices and the tensor's dims", function()
    assert.matches("get: 3 indices for the 2-d tensor [2, 3] (give 2, or 1 flat index)",
                   err_of(function() return t:get(0, 0, 0) end), 1, true)
    assert.matches("get: 0 indices for the 2-d tensor [2, 3] (give 2, or 1 flat index)",
                   err_of(function() return t:get() end), 1, true)
    assert.matches("set: 3 indices for the 2-d tensor [2, 3] (give 2, or 1 flat index)",
                   err_of(function() return t:set(0, 0, 0, 1) end), 1, true)
    assert.matches("set: expected indices and a value, got 1 argument",
                   err_of(function() return t:set(1) end), 1, true)
  end)

  it("name the index, its dim and the dim's size", function()
    assert.matches("get: index 3 out of range for dim 2 of [2, 3] (size 3; indices are 0-based)",
                   err_of(function() return t:get(0, 3) end), 1, true)
    assert.matches("get: index 2 out of range for dim 1 of [2, 3] (size 2; indices are 0-based)",
                   err_of(function() return t:get(2, 0) end), 1, true)
    assert.matches("set: index -1 out of range for dim 2 of [2, 3] (size 3; indices are 0-based)",
                   err_of(function() return t:set(0, -1, 5) end), 1, true)
    assert.matches("get: index 2 (dim 2 of [2, 3]) must be an integer, got 0.5",
                   err_of(function() return t:get(1, 0.5) end), 1, true)
    assert.matches("get: index 1 (dim 1 of [2, 3]) must be an integer, got string",
                   err_of(function() return t:get("1", 0) end), 1, true)
    assert.matches("get: index 2 (dim 2 of [2, 3]) must be an integer, got nil",
                   err_of(function() return t:get(1, nil) end), 1, true)
    assert.matches("get: index 1 (dim 1 of [2, 3]) must be an integer, got nan",
                   err_of(function() return t:get(0 / 0, 0) end), 1, true)
    assert.same({{0, 0, 0}, {0, 0, 0}}, t:tolist())   -- no failed set wrote anything
  end)

  it("say why a tensor without data cannot be read: meta, a sharded parameter, released storage", function()
    local m = fsdp.zeros({2, 3}, {device = "meta"})
    assert.matches("get: tensor [2, 3] is on meta (materialise it first)", err_of(function() return m:get(1, 2) end),
                   1, true)
    assert.matches("set: tensor [2, 3] is on meta (materialise it first)", err_of(function() return m:set(1, 2, 0) end),
                   1, true)
    -- what FSDP does to a parameter between gathers (parallel/units.lua): the full tensor's storage released,
    -- its local part (this rank's rows) attached
    local full = fsdp.zeros({4, 2})
    fsdp.C.fl_tensor_storage_release(full._p)
    assert.matches("get: tensor [4, 2] has released storage", err_of(function() return full:get(0, 0) end), 1, true)
    fsdp.Tensor.set_local(full, fsdp.zeros({2, 2}))
    assert.matches("get: parameter [4, 2] is sharded now (not gathered); read this rank's rows from "
                   .. "fsdp.Tensor.local_of(p)", err_of(function() return full:get(3, 1) end), 1, true)
    local freed = fsdp.zeros({2}); freed:free()
    assert.matches("get: tensor was freed", err_of(function() return freed:get(0) end), 1, true)
  end)
end)

describe("reading a whole tensor without data", function()
  it("is an error for item, tolist and totable (totable returned NaNs)", function()
    local m = fsdp.zeros({1, 1}, {device = "meta"})
    for _, f in ipairs {"item", "tolist", "totable"} do
      assert.matches(f .. ": tensor [1, 1] is on meta (materialise it first)", err_of(function() return m[f](m) end),
                     1, true)
    end
    local r = fsdp.zeros({1})
    fsdp.C.fl_tensor_storage_release(r._p)
    assert.matches("item: tensor [1] has released storage", err_of(function() return r:item() end), 1, true)
    assert.matches("totable: tensor [1] has released storage", err_of(function() return r:totable() end), 1, true)
  end)
end)
