-- spec/safetensors_spec.lua: reading files written by Hugging Face's safetensors, write/read round trips in every
-- dtype, and clear errors on malformed files.
local fsdp = require "fsdp"
local st = require "fsdp.safetensors"

local FIX = "spec/fixtures/gpt2_tied/model.safetensors"

local function tmpname(tag) return os.tmpname() .. "-" .. tag .. ".safetensors" end

local function slurp(path)
  local f = assert(io.open(path, "rb")); local s = f:read("*a"); f:close(); return s
end

local function spit(path, s)
  local f = assert(io.open(path, "wb")); f:write(s); f:close()
end

local function le_u64(n)
  local b = {}
  for i = 1, 8 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
  return table.concat(b)
end

-- A raw file: the header text as given (no validation on our side) and `nbytes` zero bytes of data.
local function raw_file(header, nbytes)
  local p = tmpname("raw")
  spit(p, le_u64(#header) .. header .. string.rep("\0", nbytes))
  return p
end

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

describe("safetensors", function()
  it("reads the header of a file written by transformers", function()
    local h = st.header(FIX)
    assert.equal(28, #h.names)
    assert.equal("pt", h.metadata.format)
    local e = h.tensors["transformer.wte.weight"]
    assert.same({101, 32}, e.shape)
    assert.equal("F32", e.dtype)
    assert.equal(101 * 32 * 4, e.nbytes)
    assert.equal(0, h.data_start % 8)   -- the reference writer pads the header to 8 bytes
  end)

  it("writes back a loaded transformers file byte for byte", function()
    -- An independent check of layout, ordering, JSON formatting and padding: transformers wrote the original.
    local tensors, meta = st.load(FIX)
    local out = tmpname("copy")
    st.save(out, tensors, meta)
    assert.is_true(slurp(out) == slurp(FIX))
    os.remove(out)
  end)

  it("round-trips every dtype, scalars, empty and strided tensors exactly", function()
    local t = {
      a_f32 = fsdp.randn({3, 5}, {seed = 1}),
      b_f64 = fsdp.randn({4}, {dtype = "f64", seed = 2}),
      c_bf16 = fsdp.randn({2, 3}, {seed = 3}):to("bf16"),
      d_f16 = fsdp.randn({7}, {seed = 4}):to("f16"),
      e_i32 = fsdp.tensor({-3, 0, 2147483647}, {dtype = "i32"}),
      f_i64 = fsdp.tensor({2 ^ 40 + 1, -7}, {dtype = "i64"}),
      g_u8 = fsdp.tensor({0, 255, 17}, {dtype = "u8"}),
      h_bool = fsdp.tensor({1, 0, 1}, {dtype = "bool"}),
      i_scalar = fsdp.tensor(2.5),
      j_empty = fsdp.zeros({0, 4}),
      k_transposed = fsdp.arange(6, {dtype = "f32"}):view(2, 3):transpose(1, 2),
    }
    local p = tmpname("rt")
    st.save(p, t, {note = "x"})
    local back, meta = st.load(p)
    assert.same({note = "x"}, meta)
    for name, x in pairs(t) do
      assert.equal(x.dtype, back[name].dtype, name)
      assert.same(x:shape(), back[name]:shape(), name)
      assert.same(x:totable(), back[name]:totable(), name)
    end
    assert.same({{0, 3}, {1, 4}, {2, 5}}, back.k_transposed:tolist())
    assert.is_nil(io.open(p .. ".tmp", "rb"))   -- renamed into place
    os.remove(p)
  end)

  it("converts dtypes while loading and loads a subset by name", function()
    local x = fsdp.randn({4, 3}, {seed = 5})
    local p = tmpname("conv")
    st.save(p, {x = x:to("bf16"), y = x})
    local got = st.load(p, {names = {"x"}, dtype = "f32"})
    assert.is_nil(got.y)
    assert.equal("f32", got.x.dtype)
    -- the engine's cast path is the second computation of the same rounding
    assert.same(x:to("bf16"):to("f32"):totable(), got.x:totable())
    assert.matches("has no tensor 'z'", err_of(st.load, p, {names = {"z"}}))
    assert.matches("unknown option 'dtyp'", err_of(st.load, p, {dtyp = "f32"}))
    os.remove(p)
  end)

  it("names file, offsets and sizes when a file is truncated", function()
    local p = tmpname("trunc")
    st.save(p, {w = fsdp.ones({64})})
    local s = slurp(p)
    spit(p, s:sub(1, #s - 10))
    local e = err_of(st.load, p)
    assert.matches(p, e, 1, true)
    assert.matches("tensor 'w'", e)
    assert.matches("truncated", e)
    spit(p, s:sub(1, 5))
    assert.matches("truncated", err_of(st.header, p))
    spit(p, le_u64(4000) .. "{}")
    assert.matches("header of 4000 bytes", err_of(st.header, p))
    os.remove(p)
  end)

  it("rejects bad JSON, overlaps, size mismatches and unknown dtypes", function()
    local p = raw_file('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', 8)
    assert.matches("malformed JSON header", err_of(st.header, p))
    os.remove(p)
    p = raw_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12)
    local e = err_of(st.header, p)
    assert.matches("overlap", e)
    assert.matches("'a' %[0, 8%)", e)
    os.remove(p)
    p = raw_file('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', 8)
    assert.matches("tensor 'a': data_offsets %[0, 8%] hold 8 bytes but shape %[3%] of F32 needs 12", err_of(st.header, p))
    os.remove(p)
    p = raw_file('{"a":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}', 8)
    assert.matches("tensor 'a': unknown dtype 'F7'", err_of(st.header, p))
    os.remove(p)
    p = raw_file('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 8)
    assert.matches("run past the end of the data", err_of(st.header, p))
    os.remove(p)
    -- valid in the format, not in the engine: refused by name on load
    p = raw_file('{"q":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}      ', 2)
    assert.equal(1, #st.header(p).names)
    assert.matches("tensor 'q' has dtype I8, which the engine does not support", err_of(st.load, p))
    os.remove(p)
    assert.matches("cannot open", err_of(st.header, "/nonexistent/x.safetensors"))
  end)

  it("rejects what the reference implementation rejects: holes, trailing bytes, duplicates, bad UTF-8, overflow", function()
    local cases = {
      {'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8, "tensor 'a' begins at byte 4 of the data, leaving a hole after byte 0"},
      {'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8, "the tensors end at byte 4 of the data but the file holds 8 bytes"},
      {'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8,
       "tensor 'a' appears twice in the header"},
      {'{"\\u00e9":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\\u00e9":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4,
       "appears twice"},
      {'{"a\255":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4, "not valid UTF%-8"},
      {'{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}', 4, "too large"},
    }
    for _, c in ipairs(cases) do
      local p = raw_file(c[1], c[2])
      local e = err_of(st.header, p)
      assert.matches(c[3], e)
      assert.matches(p, e, 1, true)   -- the file is named
      os.remove(p)
    end
    -- empty tensors sit anywhere in the contiguous run; the order in the header does not matter
    local p = raw_file('{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"e":{"dtype":"F32","shape":[0],'
                       .. '"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8)
    assert.same({"a", "e", "b"}, st.header(p).names)
    os.remove(p)
  end)
end)
