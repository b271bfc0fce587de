-- spec/checkpoint_checksum_spec.lua: the CRC32C of every training checkpoint file (fsdp.checkpoint, engine/io), and
-- the removal of staging directories left by killed saves (checkpoint/publish.lua), in one process; the multi-rank
-- cases are spec/dist/checkpoint_checksum_spec.lua. The second code path is a bitwise CRC32C written here in Lua
-- over the bytes on disk; a damaged file must be named by load (before it changes anything) and by inspect.
local ffi  = require "ffi"
local bit  = require "bit"
local fsdp = require "fsdp"
local D    = require "dist"

local ck = fsdp.checkpoint
local C = require("fsdp.core").C
local inspect = require "fsdp.inspect"

-- CRC32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time: the definition, not the engine's tables.
local function crc32c(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do
    c = bit.bxor(c, s:byte(i))
    for _ = 1, 8 do
      local lsb = bit.band(c, 1)
      c = bit.rshift(c, 1)
      if lsb == 1 then c = bit.bxor(c, 0x82F63B78) end
    end
  end
  return ("%08x"):format(bit.band(bit.bnot(c), 0xFFFFFFFF) % 2 ^ 32)
end

local function tiny(seed) return fsdp.models.build(fsdp.models.tiny_config("gpt2"), {seed = seed}) end

local function ids(seed)
  local t = fsdp.empty({2, 16}, {dtype = "i64"})
  local p, x = t:data_ptr("int64_t *"), seed
  for i = 0, 31 do x = (x * 1103515245 + 12345) % 2147483648; p[i] = x % 101 end
  return t
end

local function train(model, opt, k)
  local x = ids(k)
  model(x, {labels = x}).loss:backward()
  opt:step(); opt:zero_grad()
end

-- Every parameter's and optimizer state tensor's bytes.
local function state_bytes(model, opt)
  local out = {}
  for name, p in model:named_parameters() do out[name] = ffi.string(p:data_ptr(), p:numel() * 4) end
  opt:each_param(function(id, p)
    for k, v in pairs(opt.state[id] or {}) do
      out[id .. "." .. k] = type(v) == "number" and v or ffi.string(v:data_ptr(), p:numel() * 4)
    end
  end)
  return out
end

local function meta_of(dir) return require("cjson").decode(D.read_file(dir .. "/metadata.json")) end

local function write_meta(dir, meta)
  local f = assert(io.open(dir .. "/metadata.json", "wb"))
  f:write(require("fsdp.checkpoint.hf").encode_json(meta, "", {}, nil))
  f:close()
end

local RANK0 = "rank-00000-of-00001.safetensors"

-- Flips every bit of the byte at `at` (0-based) of `path`.
local function flip(path, at)
  local f = assert(io.open(path, "r+b"))
  f:seek("set", at)
  local b = f:read(1):byte()
  f:seek("set", at)
  f:write(string.char(255 - b))
  f:close()
end

local function saved(dir, opts)
  local model = tiny(1)
  local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2})
  train(model, opt, 1)
  local o = {model = model, optimizer = opt, step = 1}
  for k, v in pairs(opts or {}) do o[k] = v end
  ck.save(dir, o)
  ck.wait()
  return model, opt
end

local function copy(from)
  local to = D.tmpdir() .. "/ck"
  os.execute(("cp -r %s %s"):format(D.quote(from), D.quote(to)))
  return to
end

-- A load into a fresh model and optimizer must fail and leave both exactly as they were.
local function load_fails(dir)
  local model = tiny(5)
  local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2})
  train(model, opt, 2)
  local before = state_bytes(model, opt)
  local ok, err = pcall(ck.load, dir, {model = model, optimizer = opt})
  assert.is_false(ok, "the load succeeded")
  assert.same(before, state_bytes(model, opt))
  assert.equal(1e-2, opt.param_groups[1].lr)
  return (tostring(err):gsub("^[^:]+:%d+: ", ""))   -- the position of the caller's load
end

local function inspect_fails(dir)
  local ok, err = pcall(inspect.inspect, dir)
  assert.is_false(ok, "inspect passed the checkpoint")
  return type(err) == "table" and err.msg or tostring(err)
end

describe("CRC32C (engine/io/checksum.c)", function()
  it("matches the bitwise definition, at every alignment and when extended piece by piece", function()
    assert.equal("e3069283", ("%08x"):format(C.fl_crc32c(0, "123456789", 9)))   -- the published check value
    local x, parts = 12345, {}
    for i = 1, 3001 do x = (x * 1103515245 + 12345) % 2147483648; parts[i] = string.char(x % 256) end
    local s = table.concat(parts)
    for _, cut in ipairs {{0, 0}, {1, 7}, {3, 64}, {5, 1000}, {0, 3001}, {7, 2994}} do
      local a, n = cut[1], cut[2]
      local piece = s:sub(1, n)
      local buf = ffi.new("uint8_t[?]", 3008)
      ffi.copy(buf + a, s, #s - a)
      assert.equal(crc32c(piece), ("%08x"):format(C.fl_crc32c(0, buf + a, n)), ("offset %d, %d bytes"):format(a, n))
    end
    local whole = C.fl_crc32c(C.fl_crc32c(C.fl_crc32c(0, s, 10), s:sub(11), 1000), s:sub(1011), #s - 1010)
    assert.equal(crc32c(s), ("%08x"):format(whole))
  end)
end)

describe("training checkpoint checksums", function()
  local base

  setup(function() base = D.tmpdir() .. "/ck"; saved(base) end)

  it("lists every rank file in metadata.json with its size and CRC32C, sync and async alike", function()
    local bytes = assert(D.read_file(base .. "/" .. RANK0))
    assert.same({{name = RANK0, bytes = #bytes, crc32c = crc32c(bytes)}}, meta_of(base).files)
    local async = D.tmpdir() .. "/ck"
    saved(async, {async = true})
    assert.same(meta_of(base).files, meta_of(async).files)
    assert.equal(bytes, D.read_file(async .. "/" .. RANK0))
    local out = inspect.inspect(base)
    assert.matches("  files: 1, each matching the size and CRC32C in metadata.json\n", out, 1, true)
    assert.matches(("crc32c %s"):format(crc32c(bytes)), out, 1, true)
  end)

  it("resumes an unmodified checkpoint bit for bit", function()
    local a, oa = saved(D.tmpdir() .. "/ck2")
    local b = tiny(9)
    local ob = fsdp.optim.AdamW(b:parameters(), {lr = 5})
    ck.load(base, {model = b, optimizer = ob})
    assert.same(state_bytes(a, oa), state_bytes(b, ob))
    local keys = require "fsdp.dropout_keys"   -- one counter per process: both steps start from the restored one
    local at = keys.counter()
    train(a, oa, 3)
    keys.set_counter(at)
    train(b, ob, 3)
    assert.same(state_bytes(a, oa), state_bytes(b, ob))
  end)

  it("names a rank file with one flipped byte (in the tensor data or the header), before loading anything", function()
    local bytes = D.read_file(base .. "/" .. RANK0)
    for _, at in ipairs {#bytes - 3, 20} do   -- the last tensor's last float; a byte of the JSON header
      local d = copy(base)
      local path = d .. "/" .. RANK0
      flip(path, at)
      local want = ("the file of rank 0, '%s', fails its checksum: CRC32C %s, metadata.json says %s: damaged since "
                    .. "it was saved"):format(path, crc32c(D.read_file(path)), crc32c(bytes))
      assert.equal(("checkpoint.load '%s': %s"):format(d, want), load_fails(d))
      assert.equal(want, inspect_fails(d))
      assert.equal(1, inspect.main(d))
      D.cleanup(d:match("^(.*)/ck$"))
    end
  end)

  it("skips the verification with verify = false, and checks that option", function()
    local d = copy(base)
    local path = d .. "/" .. RANK0
    local at = fsdp.safetensors.header(path).tensors["model.transformer.wte.weight"].offset
    flip(path, at + 3)   -- the first float of the embedding: loaded as it is, unverified
    local model = tiny(5)
    ck.load(d, {model = model, verify = false})
    assert.equal(D.read_file(path):sub(at + 1, at + 4), ffi.string(model.transformer.wte.weight:data_ptr(), 4))
    local ok, err = pcall(ck.load, d, {model = model, verify = "no"})
    assert.is_false(ok)
    assert.matches("checkpoint.load: verify must be a boolean, got string", tostring(err), 1, true)
    D.cleanup(d:match("^(.*)/ck$"))
  end)

  it("names a truncated or missing rank file", function()
    local d = copy(base)
    local path = d .. "/" .. RANK0
    local bytes = D.read_file(path)
    local f = assert(io.open(path, "wb")); f:write(bytes:sub(1, #bytes - 4)); f:close()
    local want = ("the file of rank 0, '%s', is %d bytes, metadata.json says %d: truncated or rewritten since it was "
                  .. "saved"):format(path, #bytes - 4, #bytes)
    assert.equal(("checkpoint.load '%s': %s"):format(d, want), load_fails(d))
    assert.equal(want, inspect_fails(d))
    os.remove(path)
    assert.matches(("the file of rank 0, '%s', is missing or damaged: cannot open"):format(path), load_fails(d), 1, true)
    D.cleanup(d:match("^(.*)/ck$"))
  end)

  it("refuses a files entry that is not {name, bytes, crc32c}", function()
    local d = copy(base)
    local meta = meta_of(d)
    meta.files[1].crc32c = "xyz"
    write_meta(d, meta)
    assert.matches("metadata.json: files[1] is not {name = '" .. RANK0 .. "', bytes =, crc32c = 8 hex digits}",
                   load_fails(d), 1, true)
    D.cleanup(d:match("^(.*)/ck$"))
  end)

  it("loads a checkpoint saved before checksums (files by name) unverified; inspect says so", function()
    local d = copy(base)
    local meta = meta_of(d)
    meta.files = {RANK0}
    write_meta(d, meta)
    local a, oa = saved(D.tmpdir() .. "/ck3")
    local b = tiny(9)
    local ob = fsdp.optim.AdamW(b:parameters(), {lr = 5})
    ck.load(d, {model = b, optimizer = ob})
    assert.same(state_bytes(a, oa), state_bytes(b, ob))
    assert.matches("  files: not verified (metadata.json lists no checksums: saved by an older version)\n",
                   inspect.inspect(d), 1, true)
    D.cleanup(d:match("^(.*)/ck$"))
  end)
end)

describe("staging directories of killed saves", function()
  pcall(ffi.cdef, "int getppid(void);")

  it("are removed by the next successful save to their parent, unless their process still runs", function()
    local root = D.tmpdir()
    -- a PID that ran and exited: the shell's own, printed before it ends
    local p = io.popen("sh -c 'echo $$'")
    local dead = tonumber(p:read("*l"))
    p:close()
    assert.equal(0, C.fl_process_alive(dead))
    local live = ffi.C.getppid()   -- the process that started busted: alive while this spec runs
    assert.equal(1, C.fl_process_alive(live))
    local function stage(name)
      local path = root .. "/" .. name
      os.execute(("mkdir -p %s && echo x > %s/rank-00000-of-00001.safetensors"):format(D.quote(path), D.quote(path)))
      return path
    end
    local stale = stage((".ck.tmp.%d"):format(dead))
    local running = stage((".ck.tmp.%d"):format(live))
    local other = stage((".other.tmp.%d"):format(dead))   -- another checkpoint's: not this save's to judge
    local odd = stage(".ck.tmp.12x")                      -- not a staging name
    saved(root .. "/ck")
    local function is_dir(path) return C.fl_is_dir(path) == 1 end
    assert.is_false(is_dir(stale))
    assert.is_true(is_dir(running))
    assert.is_true(is_dir(other))
    assert.is_true(is_dir(odd))
    assert.is_true(is_dir(root .. "/ck"))
    D.cleanup(root)
  end)
end)
