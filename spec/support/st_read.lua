-- spec/support/st_read.lua: a minimal safetensors reader for specs (8-byte little-endian header length,
-- JSON header, raw little-endian bytes). It exists so op specs do not depend on the real loader
-- (lua/fsdp/safetensors.lua); it reads whole files into memory, which is fine for fixtures of a few KB.
local ffi   = require "ffi"
local cjson = require "cjson"
local fsdp  = require "fsdp"

local M = {}

local DTYPES = {F32 = "f32", F64 = "f64", BF16 = "bf16", F16 = "f16", I32 = "i32", I64 = "i64", U8 = "u8", BOOL = "bool"}

-- load(path) -> {name = Tensor}, metadata table (or nil)
function M.load(path)
  local f = assert(io.open(path, "rb"))
  local bytes = f:read("*a")
  f:close()
  assert(#bytes >= 8, path .. ": truncated (no header length)")
  local n = 0
  for i = 8, 1, -1 do n = n * 256 + bytes:byte(i) end
  assert(8 + n <= #bytes, path .. ": header runs past the end of the file")
  local header = cjson.decode(bytes:sub(9, 8 + n))
  local base = 8 + n
  local out = {}
  for name, e in pairs(header) do
    if name ~= "__metadata__" then
      local dt = DTYPES[e.dtype] or error(("%s: tensor %s has unknown dtype %s"):format(path, name, tostring(e.dtype)))
      local t = fsdp.empty(e.shape, {dtype = dt})
      local a, b = e.data_offsets[1], e.data_offsets[2]
      assert(b - a == t:numel() * tonumber(fsdp.C.fl_dtype_size(t._p.dtype)), name .. ": byte size does not match shape")
      assert(base + b <= #bytes, name .. ": data runs past the end of the file")
      if b > a then ffi.copy(fsdp.C.fl_tensor_data(t._p), ffi.cast("const char *", bytes) + base + a, b - a) end
      out[name] = t
    end
  end
  return out, header.__metadata__
end

return M
