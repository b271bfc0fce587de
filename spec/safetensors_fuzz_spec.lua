-- spec/safetensors_fuzz_spec.lua: 360 corrupted safetensors files made from a seed — truncations, bit flips and
-- byte overwrites in the length and the JSON header — must each either fail with an error naming the file, or
-- load exactly the bytes the valid file holds for every tensor it still names (a flip that keeps the header
-- valid, e.g. in a name, is not corruption a reader can see). None may crash, hang or read other bytes.
local fsdp = require "fsdp"
local st   = fsdp.safetensors

local function slurp(p) local f = assert(io.open(p, "rb")); local s = f:read("*a"); f:close(); return s end
local function spit(p, s) local f = assert(io.open(p, "wb")); f:write(s); f:close() end

-- A deterministic LCG (upper bits), so a failure names a case that reruns identically.
local state = 20261201
local function rand(n)
  state = (state * 1103515245 + 12345) % 2147483648
  return math.floor(state / 65536) % n
end

describe("corrupted safetensors files", function()
  it("are refused with an error naming the file, or load the original bytes", function()
    local dir = os.tmpname(); os.remove(dir); os.execute("mkdir -p " .. dir)
    local good = dir .. "/good.safetensors"
    st.save(good, {
      ["model.w"] = fsdp.randn({3, 4}, {seed = 1}),
      ["model.b"] = fsdp.randn({5}, {seed = 2}):to("bf16"),
      ids = fsdp.tensor({7, -9}, {dtype = "i64"}),
      empty = fsdp.zeros({0, 3}),
    }, {format = "pt"})
    local bytes = slurp(good)
    local hlen = 0
    for i = 8, 1, -1 do hlen = hlen * 256 + bytes:byte(i) end
    local ref = {}
    for name, t in pairs(st.load(good)) do ref[name] = {dtype = t.dtype, shape = t:shape(), bytes = t:numel() > 0 and
      require("ffi").string(t:data_ptr(), t:numel() * fsdp.C.fl_dtype_size(fsdp.C.fl_dtype_from_name(t.dtype))) or ""} end

    local cases, refused, loaded = {}, 0, 0
    for _ = 1, 120 do cases[#cases + 1] = {"truncate", rand(#bytes)} end
    for _ = 1, 160 do cases[#cases + 1] = {"flip", rand(8 + hlen), rand(8)} end
    for _ = 1, 80 do cases[#cases + 1] = {"byte", 9 + rand(hlen), rand(256)} end
    local p = dir .. "/bad.safetensors"
    for i, c in ipairs(cases) do
      local s
      if c[1] == "truncate" then s = bytes:sub(1, c[2])
      else
        local pos = c[2] + (c[1] == "flip" and 1 or 0)
        local b = c[1] == "flip" and bit.bxor(bytes:byte(pos), bit.lshift(1, c[3])) or c[3]
        s = bytes:sub(1, pos - 1) .. string.char(b) .. bytes:sub(pos + 1)
      end
      spit(p, s)
      local ok, res = pcall(st.load, p)
      local what = ("case %d (%s %s %s)"):format(i, c[1], tostring(c[2]), tostring(c[3]))
      if ok then
        loaded = loaded + 1
        for name, t in pairs(res) do
          local r = ref[name]
          if r and r.dtype == t.dtype and table.concat(r.shape, ",") == table.concat(t:shape(), ",") then
            local got = t:numel() > 0 and require("ffi").string(t:data_ptr(), #r.bytes) or ""
            assert.is_true(got == r.bytes, what .. ": tensor " .. name .. " loaded other bytes")
          end
        end
      else
        refused = refused + 1
        assert.is_string(res, what)
        assert.matches("safetensors", res, 1, true)
        assert.matches(p, res, 1, true)
      end
    end
    assert.equal(360, refused + loaded)
    assert.is_true(refused > 300, ("only %d of 360 corruptions were refused"):format(refused))
    os.remove(p); os.remove(good); os.remove(dir)
  end)
end)
