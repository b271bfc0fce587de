-- spec/dist/checkpoint_checksum_spec.lua: the CRC32C of every rank's file of a training checkpoint saved at 2 ranks
-- (sync and async) reaches metadata.json, and a damaged file of rank 1 is named on every rank of a 2-rank load and
-- by a 1-process load. The second code path is a bitwise CRC32C written here over the bytes on disk. The single
-- process cases are spec/checkpoint_checksum_spec.lua.
local bit  = require "bit"
local fsdp = require "fsdp"
local D    = require "dist"

local WORKER = "spec/workers/resume_worker.lua"

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

local function run(n, dir, args)
  local res = D.run(n, WORKER, args, {dir = dir, timeout = 90})
  assert(res.code == 0 and not res.timed_out, res.output)
  return D.results(res)
end

local FILES = {"rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"}

describe("checkpoint checksums at 2 ranks", function()
  local first

  setup(function()
    first = D.tmpdir()
    run(2, first, {"phase=first", "mode=fsdp", "models=gpt2", "async=1", "steps=3", "save_at=3"})
  end)

  it("list both ranks' files in metadata.json with their sizes and CRC32C, sync and async alike", function()
    for _, d in ipairs {first .. "/ckpt/gpt2", first .. "/ckpt/gpt2-async"} do
      local meta = require("cjson").decode(D.read_file(d .. "/metadata.json"))
      local want = {}
      for i, name in ipairs(FILES) do
        local bytes = assert(D.read_file(d .. "/" .. name))
        want[i] = {name = name, bytes = #bytes, crc32c = crc32c(bytes)}
      end
      assert.same(want, meta.files)
    end
  end)

  it("name a damaged file of rank 1 on every rank of a load, and in one process", function()
    local dir = D.tmpdir()
    os.execute(("mkdir -p %s/ckpt && cp -r %s/ckpt/gpt2 %s/ckpt/gpt2"):format(D.quote(dir), D.quote(first),
                                                                             D.quote(dir)))
    local path = dir .. "/ckpt/gpt2/" .. FILES[2]
    local good = D.read_file(path)
    local f = assert(io.open(path, "r+b"))
    f:seek("set", #good - 3)
    f:write(string.char(255 - good:byte(#good - 2)))   -- every bit of a byte of the last tensor
    f:close()
    local bad = D.read_file(path)
    local want = ("the file of rank 1, '%s', fails its checksum: CRC32C %s, metadata.json says %s: damaged since it "
                  .. "was saved"):format(path, crc32c(bad), crc32c(good))
    local ranks = run(2, dir, {"phase=badload", "mode=fsdp", "models=gpt2"})
    assert.is_false(ranks[2].ok)
    assert.matches(want, ranks[2].err, 1, true)                          -- rank 1 verified its own file
    assert.is_false(ranks[1].ok)
    assert.matches("checkpoint.load: rank 1 failed: ", ranks[1].err, 1, true)
    assert.matches(want, ranks[1].err, 1, true)
    -- one process verifies both files
    local model = fsdp.models.build(fsdp.models.tiny_config("gpt2"), {seed = 1})
    local ok, err = pcall(fsdp.checkpoint.load, dir .. "/ckpt/gpt2", {model = model})
    assert.is_false(ok)
    assert.matches(want, tostring(err), 1, true)
    D.cleanup(dir)
  end)

  teardown(function() if first then D.cleanup(first) end end)
end)
