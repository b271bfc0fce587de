-- spec/dist/hf_save_spec.lua: save_pretrained on real ranks (FSDP with two plans, DDP, HSDP) writes, without
-- gathering, the same bytes one process writes from the same weights — single file, indexed past max_shard_size,
-- and bf16 — and a sharded load reads exactly its rows plus the headers. A save killed at any point leaves the
-- previous checkpoint intact. The worker is spec/workers/hf_save_worker.lua.
local fsdp  = require "fsdp"
local cjson = require "cjson"
local ffi   = require "ffi"
local D     = require "dist"

local WORKER = "spec/workers/hf_save_worker.lua"

local function bits_equal(a, b, what)
  assert.same(a:shape(), b:shape(), what)
  assert.equal(a.dtype, b.dtype, what)
  local n = a:numel() * fsdp.C.fl_dtype_size(fsdp.C.fl_dtype_from_name(a.dtype))
  assert.is_true(ffi.string(a:data_ptr(), n) == ffi.string(b:data_ptr(), n), what .. ": bits differ")
end

local function listing(dir)
  local p = io.popen("ls -A " .. D.quote(dir))
  local out = {}
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  return out
end

-- One process saves `weights` (name -> f32 tensor) with opts: the reference the ranks' files must equal.
local cfg = fsdp.models.tiny_config("gpt2", {vocab_size = 97, n_embd = 40, n_head = 4})
local function reference_save(weights, dir, opts)
  local m = fsdp.models.build(cfg, {seed = 1})
  for name, p in m:named_parameters() do p:copy_(assert(weights[name], name)) end
  fsdp.models.save_pretrained(m, dir, opts)
  return m
end

-- bf16 by round-to-nearest-even from the f32 bits, computed here rather than by the engine
local F32_BITS = ffi.typeof("union { float f; uint32_t u; }")
local function bf16_bits(x)
  local u = F32_BITS()
  u.f = x
  local b = u.u
  return math.floor((b + 0x7FFF + math.floor(b / 65536) % 2) / 65536) % 65536
end

describe("save_pretrained on N ranks", function()
  for _, case in ipairs {{"fsdp", 2}, {"fsdp", 3}, {"manual", 3}, {"mp", 2}, {"ddp", 3}, {"hsdp", 4}} do
    local mode, n = case[1], case[2]
    it(("%s at %d ranks writes one process's bytes (single, indexed, bf16) and reads back only its rows"):format(mode, n), function()
      local res = D.run(n, WORKER, {mode}, {timeout = 90})
      assert(res.code == 0 and not res.timed_out, res.output)
      local full = fsdp.safetensors.load(res.dir .. "/full.safetensors")
      local ref = D.tmpdir()
      for _, v in ipairs {{"single", nil}, {"indexed", {max_shard_size = "20KB"}},
                          {"bf16", {dtype = "bf16", max_shard_size = "20KB"}}} do
        reference_save(full, ref .. "/" .. v[1], v[2])
        local mine, theirs = listing(res.dir .. "/" .. v[1]), listing(ref .. "/" .. v[1])
        assert.same(theirs, mine, v[1] .. ": the files")
        for _, f in ipairs(theirs) do
          assert.is_true(D.read_file(ref .. "/" .. v[1] .. "/" .. f) == D.read_file(res.dir .. "/" .. v[1] .. "/" .. f),
                         ("%s/%s differs from one process's"):format(v[1], f))
        end
      end
      -- the sharded load of the indexed files: the weights come back, each rank read its rows and the headers
      local back = fsdp.safetensors.load(res.dir .. "/reloaded.safetensors")
      for name, t in pairs(back) do bits_equal(t, full[name], name) end
      local shards = 0
      for _, r in ipairs(D.results(res)) do
        assert.equal(r.shard_bytes + r.header_bytes, r.bytes_read, ("rank %d read other bytes than its rows"):format(r.rank))
        assert.is_true(r.shard_bytes < r.full_bytes / n + 8000, ("rank %d holds %d of %d bytes"):format(r.rank, r.shard_bytes, r.full_bytes))
        shards = shards + r.shard_bytes
      end
      assert.equal(D.results(res)[1].full_bytes, shards)
    end)
  end
end)

describe("save_pretrained in one process", function()
  local cfg_u = fsdp.models.tiny_config("gpt2", {vocab_size = 97, n_embd = 40, n_head = 4, tie_word_embeddings = false})
  local model = fsdp.models.build(cfg_u, {seed = 9})
  local orig = {}
  for name, p in model:named_parameters() do orig[name] = p end

  it("splits past max_shard_size greedily in state-dict order, as transformers, with its index", function()
    local dir = D.tmpdir() .. "/ck"
    fsdp.models.save_pretrained(model, dir, {max_shard_size = "20KB"})
    -- the split, computed here from the parameter order and sizes
    local files, cur, size = {}, nil, 0
    local total_size, total_params = 0, 0
    for name, p in model:named_parameters() do
      local b = 4 * p:numel()
      total_size, total_params = total_size + b, total_params + p:numel()
      if b > 20000 then files[#files + 1] = {name}
      else
        if not cur or size + b > 20000 then cur, size = {}, 0; files[#files + 1] = cur end
        cur[#cur + 1] = name
        size = size + b
      end
    end
    assert.is_true(#files > 3)
    local idx = cjson.decode(D.read_file(dir .. "/model.safetensors.index.json"))
    assert.same({total_parameters = total_params, total_size = total_size}, idx.metadata)
    local expect = {"config.json", "model.safetensors.index.json"}
    for i, list in ipairs(files) do
      local fname = ("model-%05d-of-%05d.safetensors"):format(i, #files)
      expect[#expect + 1] = fname
      local hdr = fsdp.safetensors.header(dir .. "/" .. fname)
      local names = {}
      for k in pairs(hdr.tensors) do names[#names + 1] = k end
      table.sort(names); table.sort(list)
      assert.same(list, names, fname)
      for _, name in ipairs(list) do assert.equal(fname, idx.weight_map[name]) end
    end
    table.sort(expect)
    assert.same(expect, listing(dir))
    local back = fsdp.models.from_pretrained(dir)
    for name, p in back:named_parameters() do bits_equal(p, orig[name], name) end
  end)

  it("writes bf16 on request: round-to-nearest-even of every f32 weight, and says so in config.json", function()
    local dir = D.tmpdir() .. "/ck"
    fsdp.models.save_pretrained(model, dir, {dtype = "bf16"})
    assert.equal("bfloat16", cjson.decode(D.read_file(dir .. "/config.json")).dtype)
    local hdr = fsdp.safetensors.header(dir .. "/model.safetensors")
    local raw = D.read_file(dir .. "/model.safetensors")
    for name, p in model:named_parameters() do
      local e = hdr.tensors[name]
      assert.equal("BF16", e.dtype, name)
      local pp = p:data_ptr("float *")
      for i = 0, p:numel() - 1 do
        local at = e.offset + 2 * i
        local got = raw:byte(at + 1) + 256 * raw:byte(at + 2)
        if got ~= bf16_bits(pp[i]) then error(("%s[%d]: %d, expected %d"):format(name, i, got, bf16_bits(pp[i]))) end
      end
    end
  end)

  it("replaces its own files and keeps the others: stale shards go, a tokenizer stays", function()
    local parent = D.tmpdir()
    local dir = parent .. "/ck"
    fsdp.models.save_pretrained(model, dir, {max_shard_size = "20KB"})
    local f = io.open(dir .. "/tokenizer.json", "wb"); f:write("{}"); f:close()
    os.execute("mkdir -p " .. D.quote(dir .. "/extra") .. " && echo x > " .. D.quote(dir .. "/extra/notes.txt"))
    fsdp.models.save_pretrained(model, dir)
    assert.same({"config.json", "extra", "model.safetensors", "tokenizer.json"}, listing(dir))
    assert.equal("{}", D.read_file(dir .. "/tokenizer.json"))
    assert.equal("x\n", D.read_file(dir .. "/extra/notes.txt"))
    assert.same({"ck"}, listing(parent))   -- no staging directory left beside it
  end)

  it("refuses bad options before writing anything", function()
    local dir = D.tmpdir() .. "/ck"
    for _, o in ipairs {{max_shard_size = "5 parsecs"}, {max_shard_size = 0}, {max_shard_size = -1}, {dtype = "i64"},
                        {dtype = "fp8"}, {shard = true}} do
      local ok, err = pcall(fsdp.models.save_pretrained, model, dir, o)
      assert.is_false(ok)
      assert.matches("save_pretrained", tostring(err))
      assert.matches("hf_save_spec.lua", tostring(err))   -- at the caller's line
    end
    assert.is_nil(io.open(dir .. "/config.json"))
    local file = D.tmpdir() .. "/plain-file"
    io.open(file, "wb"):close()
    local ok, err = pcall(fsdp.models.save_pretrained, model, file)
    assert.is_false(ok)
    assert.matches("not a directory", tostring(err))
  end)

  it("parses sizes as transformers does", function()
    local hf = require "fsdp.checkpoint.hf"
    assert.equal(5e9, hf.parse_size("5GB"))
    assert.equal(20000, hf.parse_size("20KB"))
    assert.equal(2 ^ 30, hf.parse_size("1GiB"))
    assert.equal(500 * 2 ^ 20, hf.parse_size("500MiB"))
    assert.equal(125e6, hf.parse_size("1Gb"))   -- a lowercase b is bits
    assert.equal(1234, hf.parse_size(1234))
  end)
end)

describe("a save killed midway", function()
  for _, kill in ipairs {"1:0", "2:1", "2:0"} do
    it(("(rank %s after phase %s) leaves the previous checkpoint loadable and bit-exact"):format(kill:sub(3), kill:sub(1, 1)), function()
      local res = D.run(2, WORKER, {"fsdp", kill}, {timeout = 60})
      -- mpirun exits 137 when a rank died of SIGKILL, which dist.run also reports for a timeout: use the clock
      assert.is_true(res.elapsed < 50, res.output)
      assert.are_not.equal(0, res.code)
      assert.matches("killing myself after phase", res.output)
      local before = fsdp.safetensors.load(res.dir .. "/before.safetensors")
      local m = fsdp.models.from_pretrained(res.dir .. "/single")
      for name, p in m:named_parameters() do bits_equal(p, before[name], name) end
    end)
  end
end)

describe("a save that fails on one rank", function()
  it("raises on every rank (naming the rank), removes its staging directory and leaves the old checkpoint", function()
    local res = D.run(3, WORKER, {"fsdp", "2:1:error"}, {timeout = 60})
    assert(res.code == 0 and not res.timed_out, res.output)
    for _, r in ipairs(D.results(res)) do
      assert.is_false(r.ok)
      if r.rank == 1 then assert.matches("disk on fire", r.err)
      else assert.matches("save_pretrained: rank 1 failed .*'.*/single' is unchanged", r.err) end
    end
    assert.same({"before.safetensors", "single"}, (function()
      local out = {}
      for _, f in ipairs(listing(res.dir)) do if not f:match("^%.") and not f:match("^rank") then out[#out + 1] = f end end
      return out
    end)())
    assert.same({}, (function()   -- no staging directory beside it
      local out = {}
      for _, f in ipairs(listing(res.dir)) do if f:match("^%.single%.tmp") then out[#out + 1] = f end end
      return out
    end)())
    local before = fsdp.safetensors.load(res.dir .. "/before.safetensors")
    local m = fsdp.models.from_pretrained(res.dir .. "/single")
    for name, p in m:named_parameters() do bits_equal(p, before[name], name) end
  end)
end)
