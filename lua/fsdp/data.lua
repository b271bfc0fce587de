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

-- loader(source, {batch = B, seq = T, seed = 0, epoch = 1, rank = r, world = W}): source is a TokenFile.
--
-- Order. The loader walks one global order of windows, in global batches of G = W * B windows (W = 1, r = 0
-- without rank and world: one process, G = B). Epoch e (1-based) cuts the tokens into K = floor((n - o) / T)
-- windows of T tokens starting at o + k*T, k = 0..K-1, where the offset o = rand_int(seed, e, 0, T) (0 when
-- n < 2T or when the offset would leave fewer than G windows). The windows are shuffled by a Fisher-Yates pass
-- drawing j = rand_int(seed, e, i, i + 1) for i = K-1 down to 1, and global batch b (1-based) of the epoch is
-- windows perm[(b-1)*G + 1 .. b*G], of which rank r takes the contiguous slice perm[(b-1)*G + r*B + 1 ..
-- (b-1)*G + (r+1)*B]. An epoch has floor(K / G) global batches; then the next epoch begins. So (seed, epoch,
-- batch index) fixes every batch, and every rank of a job must pass the same seed (the order is shared).
--
-- Position. What a run has consumed is counted in global samples (windows) of the current epoch, which does not
-- depend on how the global batch is split: state() gives {epoch, samples, ...} and a loader of another world size
-- with the same global batch (4 ranks x B = 2 saved, 2 ranks x B = 4 resumed) continues with exactly the windows
-- not yet seen, none twice.
local LOADER_OPTS = {batch = true, seq = true, seed = true, epoch = true, rank = true, world = true}

local function is_count(v, lo) return type(v) == "number" and v >= lo and v == math.floor(v) and v < 2^53 end

function M.loader(source, opts)
  opts = core.check_opts("loader", opts, LOADER_OPTS, 2)
  if getmetatable(source) ~= TokenFile then error("loader: source must be a TokenFile (data.from_text or TokenFile.open)", 2) end
  local B, T = opts.batch, opts.seq
  if not is_count(B, 1) then error("loader: batch must be an integer >= 1", 2) end
  if not is_count(T, 1) then error("loader: seq must be an integer >= 1", 2) end
  if (opts.rank == nil) ~= (opts.world == nil) then
    error(("loader: rank and world go together (got rank %s, world %s)"):format(tostring(opts.rank), tostring(opts.world)), 2)
  end
  local W, r = opts.world or 1, opts.rank or 0
  if not is_count(W, 1) then error(("loader: world must be an integer >= 1, got %s"):format(tostring(W)), 2) end
  if not is_count(r, 0) or r >= W then
    error(("loader: rank must be an integer in [0, world = %d), got %s"):format(W, tostring(r)), 2)
  end
  local G = W * B
  if math.floor(source.n / T) < G then
    error(("loader: %d tokens make %d windows of %d, fewer than one %s of %d"):format(source.n, math.floor(source.n / T),
          T, W > 1 and ("global batch (%d ranks x %d)"):format(W, B) or "batch", G), 2)
  end
  local self = setmetatable({source = source, batch = B, seq = T, seed = opts.seed or 0, epoch = opts.epoch or 1,
                             index = 0, rank = r, world = W, global_batch = G}, Loader)
  self:_plan()
  return self
end

function Loader:_plan()
  local n, T, G = self.source.n, self.seq, self.global_batch
  local o = n >= 2 * T and rand_int(self.seed, self.epoch, 0, T) or 0
  if math.floor((n - o) / T) < G then o = 0 end   -- keep at least one global batch per epoch
  local K = math.floor((n - o) / T)
  local perm = {}
  for k = 1, K do perm[k] = k - 1 end
  for i = K - 1, 1, -1 do
    local j = rand_int(self.seed, self.epoch, i, i + 1)
    perm[i + 1], perm[j + 1] = perm[j + 1], perm[i + 1]
  end
  self.offset, self.windows, self.perm = o, K, perm
  self.batches_per_epoch = math.floor(K / G)
end

-- Window starts (0-based token offsets) of this rank's part of the next global batch, without building tensors.
function Loader:next_starts()
  if self.index >= self.batches_per_epoch then
    self.epoch, self.index = self.epoch + 1, 0
    self:_plan()
  end
  local starts = {}
  local base = self.index * self.global_batch + self.rank * self.batch
  for r = 1, self.batch do
    starts[r] = self.offset + self.perm[base + r] * self.seq
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

-- Resumable position: {epoch =, samples = global samples consumed in this epoch, index = global batches taken in
-- it, seed =, seq =, tokens = the source's length, global_batch =, offset = the epoch's window offset}. JSON-able.
function Loader:state()
  return {epoch = self.epoch, index = self.index, samples = self.index * self.global_batch, seed = self.seed,
          seq = self.seq, tokens = self.source.n, global_batch = self.global_batch, offset = self.offset}
end

-- set_state(s): s from state(), of this loader or of one with another world size. With `samples`, the position is
-- global: samples must be a whole number of this loader's global batches, and the windows must be the same (seq,
-- tokens and the epoch's offset, when the state has them); otherwise {epoch =, index =} counts batches. The
-- state's seed, when given, becomes the loader's (the order is the seed's).
function Loader:set_state(s)
  if type(s) ~= "table" or type(s.epoch) ~= "number" or (type(s.index) ~= "number" and type(s.samples) ~= "number") then
    error("Loader:set_state: expected {epoch = n, samples = n} or {epoch = n, index = n}", 2)
  end
  if s.seq ~= nil and s.seq ~= self.seq then
    error(("Loader:set_state: the state is of windows of %d tokens, this loader cuts %d"):format(s.seq, self.seq), 2)
  end
  if s.tokens ~= nil and s.tokens ~= self.source.n then
    error(("Loader:set_state: the state is of a source of %d tokens, this loader's has %d"):format(s.tokens, self.source.n), 2)
  end
  local index = s.index
  if s.samples ~= nil then
    if s.samples % self.global_batch ~= 0 then
      error(("Loader:set_state: %d samples of epoch %d were consumed, not a whole number of global batches of %d "
             .. "(%d ranks x %d); resume with a global batch that divides it"):format(s.samples, s.epoch,
             self.global_batch, self.world, self.batch), 2)
    end
    index = s.samples / self.global_batch
  end
  local seed, epoch, old_index = self.seed, self.epoch, self.index
  self.seed = s.seed or self.seed
  self.epoch, self.index = s.epoch, index
  self:_plan()
  if s.offset ~= nil and s.offset ~= self.offset then
    local got = self.offset
    self.seed, self.epoch, self.index = seed, epoch, old_index
    self:_plan()
    error(("Loader:set_state: epoch %d's windows start at offset %d in the state but at %d with a global batch of %d")
          :format(s.epoch, s.offset, got, self.global_batch), 2)
  end
end

return M
