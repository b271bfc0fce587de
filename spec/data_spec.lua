-- spec/data_spec.lua: the byte tokenizer, token files (write + mmap read), and the loader's documented,
-- deterministic window order, also distributed (one global order, positions in global samples).
local fsdp = require "fsdp"
local data = require "fsdp.data"

local function tmpname() return os.tmpname() end

-- The text "0123456789" repeated: token i of the stream is byte ("0" + i % 10).
local function digits(n)
  local t = {}
  for i = 0, n - 1 do t[#t + 1] = string.char(48 + i % 10) end
  return table.concat(t)
end

describe("data.encode / data.decode", function()
  it("round-trips every byte value", function()
    local bytes = {}
    for b = 0, 255 do bytes[#bytes + 1] = string.char(b) end
    local s = table.concat(bytes) .. "Hello, world\n"
    local ids = data.encode(s)
    assert.equal("i64", ids.dtype)
    assert.same({#s}, ids:shape())
    assert.equal(0, ids:get(0)); assert.equal(255, ids:get(255)); assert.equal(72, ids:get(256))  -- 'H'
    assert.equal(s, data.decode(ids))
    assert.equal("Hi", data.decode({72, 105}))
    assert.equal("", data.decode(data.encode("")))
    assert.equal(256, data.vocab_size)
  end)

  it("rejects ids outside the byte range", function()
    assert.has_error(function() data.decode({72, 256}) end)
    assert.has_error(function() data.decode({-1}) end)
  end)
end)

describe("token files", function()
  it("write u16 and i32 ids and map them back", function()
    local path = tmpname()
    local ids = {0, 1, 65535, 7, 300}
    assert.equal(5, data.write_tokens(path, ids))   -- u16: every id < 65536
    local tf = data.TokenFile.open(path)
    assert.equal(5, tf.n); assert.equal(2, tf.width)
    for i, v in ipairs(ids) do assert.equal(v, tf:get(i - 1)) end
    assert.same({65535, 7}, tf:slice(2, 4):tolist())
    tf:close()
    data.write_tokens(path, fsdp.tensor({70000, 3, 2 ^ 31 - 1}, {dtype = "i64"}))
    tf = data.TokenFile.open(path)
    assert.equal(4, tf.width)
    assert.same({70000, 3, 2 ^ 31 - 1}, tf:slice(0, 3):tolist())
    tf:close()
    os.remove(path)
  end)

  it("reject ids that do not fit, bad files and out-of-range reads", function()
    local path = tmpname()
    assert.has_error(function() data.write_tokens(path, {70000}, {dtype = "u16"}) end)
    assert.has_error(function() data.write_tokens(path, {-1}) end)
    local f = io.open(path, "wb"); f:write("not a token file at all, no"); f:close()
    local ok, err = pcall(data.TokenFile.open, path)
    assert.is_false(ok); assert.matches("not a token file", err, 1, true)
    data.write_tokens(path, {1, 2, 3})
    f = io.open(path, "ab"); f:write("x"); f:close()   -- a truncated/extended body is caught
    ok, err = pcall(data.TokenFile.open, path)
    assert.is_false(ok); assert.matches("promises 3 tokens", err, 1, true)
    data.write_tokens(path, {1, 2, 3})
    local tf = data.TokenFile.open(path)
    assert.has_error(function() tf:get(3) end)
    assert.has_error(function() tf:slice(2, 4) end)
    tf:close()
    os.remove(path)
  end)

  it("from_text reads a file's bytes, in memory or through a cached token file", function()
    local txt, cache = tmpname(), tmpname()
    os.remove(cache)
    local f = io.open(txt, "wb"); f:write(digits(1000)); f:close()
    local mem = data.from_text(txt)
    local mapped = data.from_text(txt, {cache = cache})
    assert.equal(1000, mem.n); assert.equal(1000, mapped.n)
    assert.equal(digits(1000), data.decode(mapped:slice(0, 1000)))
    assert.equal(data.decode(mem:slice(0, 1000)), data.decode(mapped:slice(0, 1000)))
    mapped:close()
    os.remove(txt); os.remove(cache)
  end)
end)

describe("data.loader", function()
  local src = data.TokenFile.from_tensor(data.encode(digits(10007)))

  it("gives labels equal to input_ids, i64 [B, T], cut from contiguous windows of the stream", function()
    local L = data.loader(src, {batch = 4, seq = 16, seed = 1})
    for _ = 1, 3 do
      local b = L:next()
      assert.same({4, 16}, b.input_ids:shape())
      assert.equal("i64", b.input_ids.dtype); assert.equal("i64", b.labels.dtype)
      assert.same(b.input_ids:tolist(), b.labels:tolist())
      for _, row in ipairs(b.input_ids:tolist()) do
        for t = 2, 16 do assert.equal((row[t - 1] - 48 + 1) % 10, row[t] - 48) end  -- consecutive tokens
      end
    end
  end)

  it("follows the documented order: offset, Fisher-Yates permutation, consecutive batches", function()
    local B, T, seed = 3, 10, 7
    local L = data.loader(src, {batch = B, seq = T, seed = seed})
    -- recompute the order independently from data._rand_int, as documented in data.lua
    local o = data._rand_int(seed, 1, 0, T)
    local W = math.floor((src.n - o) / T)
    local perm = {}
    for k = 1, W do perm[k] = k - 1 end
    for i = W - 1, 1, -1 do
      local j = data._rand_int(seed, 1, i, i + 1)
      perm[i + 1], perm[j + 1] = perm[j + 1], perm[i + 1]
    end
    assert.equal(math.floor(W / B), L.batches_per_epoch)
    for b = 1, 5 do
      local starts = L:next_starts()
      for r = 1, B do assert.equal(o + perm[(b - 1) * B + r] * T, starts[r]) end
    end
  end)

  it("gives the same batches for the same seed, others for another seed, and stays in bounds", function()
    local function take(seed, k)
      local L = data.loader(src, {batch = 8, seq = 32, seed = seed})
      local out = {}
      for _ = 1, k do
        for _, s in ipairs(L:next_starts()) do out[#out + 1] = s end
      end
      return out, L
    end
    local a, L = take(11, 50)   -- 50 * 8 windows > 312 windows per epoch: crosses into epoch 2
    local b = take(11, 50)
    local c = take(12, 50)
    assert.same(a, b)
    assert.are_not.same(a, c)
    assert.equal(2, L.epoch)
    for _, s in ipairs(a) do assert.is_true(s >= 0 and s + 32 <= src.n) end
    -- within one epoch no window repeats (a permutation)
    local seen = {}
    for i = 1, L.batches_per_epoch * 8 do
      assert.is_nil(seen[a[i]]); seen[a[i]] = true
    end
  end)

  it("resumes from state() at the same batch", function()
    local L1 = data.loader(src, {batch = 4, seq = 8, seed = 3})
    for _ = 1, 7 do L1:next_starts() end
    local st = L1:state()
    local want = L1:next().input_ids:tolist()
    local L2 = data.loader(src, {batch = 4, seq = 8, seed = 3})
    L2:set_state(st)
    assert.same(want, L2:next().input_ids:tolist())
  end)

  it("keeps one full batch per epoch when the stream holds exactly B windows", function()
    local exact = data.TokenFile.from_tensor(data.encode(digits(40)))
    local L = data.loader(exact, {batch = 4, seq = 10, seed = 5})
    for _ = 1, 3 do   -- three epochs of one batch: the offset falls back to 0, all four windows appear
      local starts = L:next_starts()
      table.sort(starts)
      assert.same({0, 10, 20, 30}, starts)
    end
    assert.equal(3, L.epoch)
  end)

  it("rejects sources too small for one batch and bad options", function()
    local tiny = data.TokenFile.from_tensor(data.encode("abcdef"))
    assert.has_error(function() data.loader(tiny, {batch = 2, seq = 4}) end)
    assert.has_error(function() data.loader(src, {batch = 2, seq = 4, shuffle = true}) end)
    assert.has_error(function() data.loader(src, {batch = 0, seq = 4}) end)
  end)
end)

describe("data.loader on ranks (rank =, world =)", function()
  local src = data.TokenFile.from_tensor(data.encode(digits(10007)))
  local function ranks(W, B, seed)
    local t = {}
    for r = 0, W - 1 do t[r + 1] = data.loader(src, {batch = B, seq = 10, seed = seed, rank = r, world = W}) end
    return t
  end
  local function global_step(loaders)   -- the global batch: the ranks' slices in rank order
    local out = {}
    for _, L in ipairs(loaders) do for _, s in ipairs(L:next_starts()) do out[#out + 1] = s end end
    return out
  end

  it("cuts one global order: rank r takes slice r of the one-process loader's batch of world x batch", function()
    local one = data.loader(src, {batch = 8, seq = 10, seed = 3})
    local four = ranks(4, 2, 3)
    for _ = 1, 140 do assert.same(one:next_starts(), global_step(four)) end   -- 125 batches an epoch: crosses into 2
    assert.equal(2, four[1].epoch)
    assert.equal(2, one.epoch)
  end)

  it("resumes a 4 x 2 position at 2 x 4 and 8 x 1: the unseen windows of the epoch, each once", function()
    for _, to in ipairs {{2, 4}, {8, 1}} do
      local four = ranks(4, 2, 9)
      local seen, count = {}, 0
      local function see(list)
        for _, s in ipairs(list) do
          assert.is_nil(seen[s], ("window %d seen twice"):format(s))
          seen[s], count = true, count + 1
        end
      end
      for _ = 1, 37 do see(global_step(four)) end
      local st = four[1]:state()
      assert.equal(37 * 8, st.samples)
      local cont = ranks(4, 2, 9)
      for _, L in ipairs(cont) do L:set_state(st) end
      local resumed = ranks(to[1], to[2], 9)
      for _, L in ipairs(resumed) do L:set_state(st) end
      local per_epoch = resumed[1].batches_per_epoch
      assert.equal(four[1].batches_per_epoch, per_epoch)
      for _ = 38, per_epoch do
        local want = global_step(cont)
        local got = global_step(resumed)
        assert.same(want, got)   -- the same global samples in the same order, split another way
        see(got)
      end
      assert.equal(per_epoch * 8, count)
      assert.equal(1, resumed[1].epoch)
    end
  end)

  it("refuses positions it cannot continue and bad rank/world, naming the numbers", function()
    local L = data.loader(src, {batch = 2, seq = 10, seed = 1, rank = 0, world = 4})
    for _ = 1, 3 do L:next_starts() end
    local st = L:state()                                   -- 24 samples
    local odd = data.loader(src, {batch = 5, seq = 10, seed = 1})
    local ok, err = pcall(odd.set_state, odd, st)
    assert.is_false(ok); assert.matches("24 samples of epoch 1 were consumed, not a whole number of global batches of 5", err, 1, true)
    local other = data.loader(src, {batch = 8, seq = 12, seed = 1})
    ok, err = pcall(other.set_state, other, st)
    assert.is_false(ok); assert.matches("windows of 10 tokens, this loader cuts 12", err, 1, true)
    local small = data.loader(data.TokenFile.from_tensor(data.encode(digits(5000))), {batch = 8, seq = 10, seed = 1})
    ok, err = pcall(small.set_state, small, st)
    assert.is_false(ok); assert.matches("a source of 10007 tokens, this loader's has 5000", err, 1, true)
    assert.has_error(function() data.loader(src, {batch = 2, seq = 10, rank = 4, world = 4}) end)
    assert.has_error(function() data.loader(src, {batch = 2, seq = 10, rank = 0}) end)
    ok, err = pcall(data.loader, data.TokenFile.from_tensor(data.encode(digits(100))), {batch = 2, seq = 10, rank = 0, world = 8})
    assert.is_false(ok); assert.matches("fewer than one global batch (8 ranks x 2) of 16", err, 1, true)
  end)
end)
