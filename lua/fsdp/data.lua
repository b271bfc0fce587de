-- lua/fsdp/data.lua: a byte-level tokenizer, token files (written once, memory-mapped for reading) and a
-- loader of random fixed-length windows with a deterministic order. Batches are {input_ids, labels}, both
-- i64 [B, T] and equal: the models shift labels inside, as Hugging Face's do.
local ffi    = require "ffi"
local bit    = require "bit"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
require "fsdp.ops.basic"   -- tensor methods (contiguous, to, view)

local M = {}

-- ---- byte-level tokenizer: token id = byte value ----
M.vocab_size = 256

-- encode(string) -> i64 tensor [#s] of byte values.
function M.encode(s)
  if type(s) ~= "string" then error(("encode: expected a string, got %s"):format(type(s)), 2) end
  local t = Tensor.empty({#s}, {dtype = "i64"})
  if #s > 0 then
    local dst, src = t:data_ptr("int64_t *"), ffi.cast("const uint8_t *", s)
    for i = 0, #s - 1 do dst[i] = src[i] end
  end
  return t
end

-- decode(ids) -> string; ids is an integer tensor (any shape, read row-major) or a Lua list.
function M.decode(ids)
  local list = ids
  if Tensor.is_tensor(ids) then list = ids:contiguous():totable() end
  if type(list) ~= "table" then error(("decode: expected a tensor or a list of ids, got %s"):format(type(ids)), 2) end
  local buf = ffi.new("uint8_t[?]", #list + 1)
  for i, v in ipairs(list) do
    if type(v) ~= "number" or v < 0 or v > 255 or v ~= math.floor(v) then
      error(("decode: id %s at position %d is not a byte (vocab 256)"):format(tostring(v), i), 2)
    end
    buf[i - 1] = v
  end
  return ffi.string(buf, #list)
end

-- ---- token files ----
-- Layout: 8-byte magic "FSDPTOK1", u32 id width in bytes (2 = u16, 4 = i32), u32 zero, u64 token count
-- (little endian), then the ids. 24 bytes of header keep the ids 8-byte aligned.
local MAGIC, HEADER = "FSDPTOK1", 24
local WIDTH = {u16 = 2, i32 = 4}
local CTYPE = {[2] = "const uint16_t *", [4] = "const int32_t *"}

ffi.cdef [[
typedef struct fl_data_tokhdr { char magic[8]; uint32_t width; uint32_t zero; uint64_t count; } fl_data_tokhdr;
]]
-- POSIX calls for mmap; another module may have declared them already.
pcall(ffi.cdef, "int open(const char *pathname, int flags, ...);")
pcall(ffi.cdef, "int close(int fd);")
pcall(ffi.cdef, "void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset);")
pcall(ffi.cdef, "int munmap(void *addr, size_t length);")
local O_RDONLY, PROT_READ, MAP_PRIVATE = 0, 1, 2
local MAP_FAILED = ffi.cast("void *", -1)

-- write_tokens(path, ids, {dtype = "u16" | "i32"}): ids is an integer tensor or a Lua list. u16 (the
-- default when every id is below 65536) halves the file.
function M.write_tokens(path, ids, opts)
  opts = core.check_opts("write_tokens", opts, {dtype = true}, 2)
  local n, get
  if Tensor.is_tensor(ids) then
    local c = ids:contiguous():to("i64")
    n = c:numel()
    local p = c:data_ptr("const int64_t *")
    -- the closure holds c, so the memory p points into lives as long as get does
    get = function(i) local _ = c; return tonumber(p[i]) end
  elseif type(ids) == "table" then
    n = #ids
    get = function(i) return ids[i + 1] end
  else
    error(("write_tokens: expected a tensor or a list of ids, got %s"):format(type(ids)), 2)
  end
  local lo, hi = math.huge, -math.huge
  for i = 0, n - 1 do local v = get(i); if v < lo then lo = v end; if v > hi then hi = v end end
  local dtype = opts.dtype or ((n == 0 or hi < 65536) and "u16" or "i32")
  local width = WIDTH[dtype]
  if not width then error(("write_tokens: unknown dtype '%s' (valid: u16, i32)"):format(tostring(dtype)), 2) end
  if n > 0 and (lo < 0 or hi >= (width == 2 and 65536 or 2^31)) then
    error(("write_tokens: ids span [%d, %d], which do not fit %s"):format(lo, hi, dtype), 2)
  end
  local body = ffi.new(width == 2 and "uint16_t[?]" or "int32_t[?]", math.max(n, 1))
  for i = 0, n - 1 do body[i] = get(i) end
  local hdr = ffi.new("fl_data_tokhdr")
  ffi.copy(hdr.magic, MAGIC, 8)
  hdr.width, hdr.zero, hdr.count = width, 0, n
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then error(("write_tokens: cannot write '%s': %s"):format(tmp, err), 2) end
  f:write(ffi.string(hdr, HEADER), ffi.string(body, n * width))
  f:close()
  local ok, rerr = os.rename(tmp, path)
  if not ok then error(("write_tokens: cannot rename to '%s': %s"):format(path, rerr), 2) end
  return n
end

local TokenFile = {}
TokenFile.__index = TokenFile
M.TokenFile = TokenFile

-- TokenFile.open(path): memory-maps a token file read-only. tf.n tokens, tf:get(i) (0-based), tf:close().
function TokenFile.open(path)
  local f, err = io.open(path, "rb")
  if not f then error(("TokenFile: cannot open '%s': %s"):format(path, err), 2) end
  local head = f:read(HEADER) or ""
  local size = f:seek("end")
  f:close()
  if #head < HEADER or head:sub(1, 8) ~= MAGIC then
    error(("TokenFile: '%s' is not a token file (bad magic or shorter than the %d-byte header)"):format(path, HEADER), 2)
  end
  local hdr = ffi.new("fl_data_tokhdr")
  ffi.copy(hdr, head, HEADER)
  local width, n = tonumber(hdr.width), tonumber(hdr.count)
  if not CTYPE[width] then error(("TokenFile: '%s' has id width %d (valid: 2, 4)"):format(path, width), 2) end
  if size ~= HEADER + n * width then
    error(("TokenFile: '%s' has %d bytes, its header promises %d tokens (%d bytes)"):format(path, size, n, HEADER + n * width), 2)
  end
  local self = setmetatable({path = path, n = n, width = width, size = size}, TokenFile)
  if n > 0 then
    local fd = ffi.C.open(path, O_RDONLY)
    if fd < 0 then error(("TokenFile: cannot open '%s' for mapping"):format(path), 2) end
    local addr = ffi.C.mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
    ffi.C.close(fd)
    if addr == MAP_FAILED then error(("TokenFile: cannot map '%s'"):format(path), 2) end
    -- The mapping lives as long as this object (or until close()).
    self.map = ffi.gc(ffi.cast("uint8_t *", addr), function(a) ffi.C.munmap(a, size) end)
    self.ids = ffi.cast(CTYPE[width], self.map + HEADER)
  end
  return self
end

-- An in-memory token source with the same interface (from_text uses it).
function TokenFile.from_tensor(ids)
  local c = ids:contiguous():to("i64")
  return setmetatable({path = nil, n = c:numel(), width = 8, keep = c, ids = c:data_ptr("const int64_t *")}, TokenFile)
end

function TokenFile:get(i)
  if i < 0 or i >= self.n then error(("TokenFile: index %d out of range [0, %d)"):format(i, self.n), 2) end
  return tonumber(self.ids[i])
end

-- Tokens [lo, hi) as an i64 tensor.
function TokenFile:slice(lo, hi)
  if lo < 0 or hi > self.n or lo > hi then error(("TokenFile: slice [%d, %d) out of range [0, %d)"):format(lo, hi, self.n), 2) end
  local t = Tensor.empty({hi - lo}, {dtype = "i64"})
  local d = t:data_ptr("int64_t *")
  for i = lo, hi - 1 do d[i - lo] = self.ids[i] end
  return t
end

function TokenFile:close()
  if self.map ~= nil then
    local map = self.map
    self.map, self.ids = nil, nil
    ffi.gc(map, nil)
    ffi.C.munmap(map, self.size)
  end
end

-- from_text(path, {cache = token_file_path}): the bytes of a text file as tokens. With `cache`, the token
-- file is written (once) and memory-mapped; otherwise the tokens stay in memory.
function M.from_text(path, opts)
  opts = core.check_opts("from_text", opts, {cache = true}, 2)
  if opts.cache then
    local f = io.open(opts.cache, "rb")
    if f then f:close(); return TokenFile.open(opts.cache) end
  end
  local f, err = io.open(path, "rb")
  if not f then error(("from_text: cannot open '%s': %s"):format(path, err), 2) end
  local text = f:read("*a")
  f:close()
  local ids = M.encode(text)
  if opts.cache then
    M.write_tokens(opts.cache, ids, {dtype = "u16"})
    return TokenFile.open(opts.cache)
  end
  return TokenFile.from_tensor(ids)
end

-- ---- deterministic randomness: splitmix64 over (seed, epoch, counter) ----
local U64 = ffi.typeof("uint64_t")
local function mix64(z)
  z = (z + 0x9E3779B97F4A7C15ULL)
  z = bit.bxor(z, bit.rshift(z, 30)) * 0xBF58476D1CE4E5B9ULL
  z = bit.bxor(z, bit.rshift(z, 27)) * 0x94D049BB133111EBULL
  return bit.bxor(z, bit.rshift(z, 31))
end
-- Uniform integer in [0, k) from the stream (seed, epoch) at position i.
local function rand_int(seed, epoch, i, k)
  local z = mix64(mix64(mix64(U64(seed)) + U64(epoch)) + U64(i))
  return math.floor(tonumber(bit.rshift(z, 11)) * 2^-53 * k)   -- 53 random bits, exact in a double
end
M._rand_int = rand_int

-- ---- the loader ----
local Loader = {}
Loader.__index = Loader
M.Loader = Loader

-- loader(source, {batch = B, seq = T, seed = 0, epoch = 1, drop_last = true}): source is a TokenFile.
--
-- Order. Epoch e (1-based) cuts the tokens into W = floor((n - o) / T) windows of T tokens starting at
-- o + k*T, k = 0..W-1, where the offset o = rand_int(seed, e, 0, T) (0 when n < 2T or when the offset
-- would leave fewer than B windows). The windows are
-- shuffled by a Fisher-Yates pass drawing j = rand_int(seed, e, i, i + 1) for i = W-1 down to 1 and
-- batch b (1-based) of the epoch takes windows perm[(b-1)*B + 1 .. b*B] in that order. An epoch has
-- floor(W / B) batches; then the next epoch begins. So (seed, epoch, batch index) fixes every batch.
function M.loader(source, opts)
  opts = core.check_opts("loader", opts, {batch = true, seq = true, seed = true, epoch = true}, 2)
  if getmetatable(source) ~= TokenFile then error("loader: source must be a TokenFile (data.from_text or TokenFile.open)", 2) end
  local B, T = opts.batch, opts.seq
  if type(B) ~= "number" or B < 1 or B ~= math.floor(B) then error("loader: batch must be an integer >= 1", 2) end
  if type(T) ~= "number" or T < 1 or T ~= math.floor(T) then error("loader: seq must be an integer >= 1", 2) end
  if math.floor(source.n / T) < B then
    error(("loader: %d tokens make %d windows of %d, fewer than one batch of %d"):format(source.n, math.floor(source.n / T), T, B), 2)
  end
  local self = setmetatable({source = source, batch = B, seq = T, seed = opts.seed or 0, epoch = opts.epoch or 1, index = 0}, Loader)
  self:_plan()
  return self
end

function Loader:_plan()
  local n, T, B = self.source.n, self.seq, self.batch
  local o = n >= 2 * T and rand_int(self.seed, self.epoch, 0, T) or 0
  if math.floor((n - o) / T) < B then o = 0 end   -- keep at least one batch per epoch
  local W = math.floor((n - o) / T)
  local perm = {}
  for k = 1, W do perm[k] = k - 1 end
  for i = W - 1, 1, -1 do
    local j = rand_int(self.seed, self.epoch, i, i + 1)
    perm[i + 1], perm[j + 1] = perm[j + 1], perm[i + 1]
  end
  self.offset, self.windows, self.perm = o, W, perm
  self.batches_per_epoch = math.floor(W / B)
end

-- Window starts (0-based token offsets) of the next batch, without building tensors.
function Loader:next_starts()
  if self.index >= self.batches_per_epoch then
    self.epoch, self.index = self.epoch + 1, 0
    self:_plan()
  end
  local starts = {}
  for r = 1, self.batch do
    starts[r] = self.offset + self.perm[self.index * self.batch + r] * self.seq
  end
  self.index = self.index + 1
  return starts
end

-- next() -> {input_ids = i64 [B, T], labels = i64 [B, T]}.
function Loader:next()
  local starts = self:next_starts()
  local B, T, ids = self.batch, self.seq, self.source.ids
  local x = Tensor.empty({B, T}, {dtype = "i64"})
  local y = Tensor.empty({B, T}, {dtype = "i64"})
  local px, py = x:data_ptr("int64_t *"), y:data_ptr("int64_t *")
  for r = 0, B - 1 do
    local s = starts[r + 1]
    for t = 0, T - 1 do
      local v = ids[s + t]
      px[r * T + t] = v
      py[r * T + t] = v
    end
  end
  return {input_ids = x, labels = y}
end

-- Resumable position: {epoch, index} (index = batches already taken in this epoch).
function Loader:state() return {epoch = self.epoch, index = self.index, seed = self.seed} end

function Loader:set_state(s)
  if type(s) ~= "table" or type(s.epoch) ~= "number" or type(s.index) ~= "number" then
    error("Loader:set_state: expected {epoch = n, index = n}", 2)
  end
  self.seed = s.seed or self.seed
  self.epoch, self.index = s.epoch, s.index
  self:_plan()
end

return M
