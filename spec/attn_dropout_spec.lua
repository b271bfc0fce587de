-- spec/attn_dropout_spec.lua: dropout on the attention probabilities inside the fused attention
-- (engine/ops/ops_attn.c), the dropout keys (seed, rank, call counter) of fsdp.dropout_keys, their replay under
-- activation checkpointing, and GPT-2 / Llama training with Hugging Face's default dropouts.
--
-- Oracles: central differences in f64 (the mask is a function of the key, so it is fixed under perturbation);
-- a plain composition of matmul, softmax and an explicit mask, whose mask bits come from a Philox written here in
-- Lua (checked against Random123's published known-answer vectors) with the documented element index; a one-hot
-- v, which makes the op print its own P M / (1-p); binomial statistics of the keep rate; and second code paths
-- (1 vs 2 threads, checkpointed vs plain, bf16 vs f32, eval vs p = 0) compared bit for bit.
local ffi  = require "ffi"
local bit  = require "bit"
local fsdp = require "fsdp"
local F    = fsdp.F
local nn   = require "fsdp.ops.nn"
local gradcheck = require("gradcheck").gradcheck

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function bits_equal(a, b)
  if a.dtype ~= b.dtype or a:numel() ~= b:numel() then return false end
  local n = a:numel() * (a.dtype == "f64" and 8 or a.dtype == "f32" and 4 or 2)
  return ffi.string(a:contiguous():data_ptr(), n) == ffi.string(b:contiguous():data_ptr(), n)
end

-- ---- an independent Philox4x32-10 and the mask it defines ----

local TWO32 = 4294967296
local function u32(x) return x % TWO32 end   -- bit.* results are signed 32-bit

local function mulhilo(a, b)
  local prod = ffi.new("uint64_t", a) * b
  return tonumber(prod % 4294967296ULL), tonumber(prod / 4294967296ULL)
end

local function philox(c0, c1, c2, c3, k0, k1)
  for _ = 1, 10 do
    local lo0, hi0 = mulhilo(0xD2511F53, c0)
    local lo1, hi1 = mulhilo(0xCD9E8D57, c2)
    c0, c1, c2, c3 = u32(bit.bxor(hi1, c1, k0)), lo1, u32(bit.bxor(hi0, c3, k1)), lo0
    k0, k1 = u32(k0 + 0x9E3779B9), u32(k1 + 0xBB67AE85)
  end
  return c0, c1, c2, c3
end

local function fnv1a(s)
  local h = 0xcbf29ce484222325ULL
  for i = 1, #s do h = bit.bxor(h, s:byte(i)) * 0x100000001b3ULL end
  return h
end

local function split(x)   -- uint64 cdata -> low, high 32-bit words as numbers
  x = ffi.cast("uint64_t", x)
  return tonumber(x % 4294967296ULL), tonumber(x / 4294967296ULL)
end

-- The documented mask: probability (b, h, i, j) of a [B, nH, T, T] attention with key `key` is kept iff
-- word (e mod 4) of Philox(counter (e / 4, stream), key seed) is >= p 2^32, e = ((b nH + h) T + i) T + j,
-- stream = fnv1a("attention_dropout") xor key * 0x9E3779B97F4A7C15. Returns a function (b, h, i, j) -> kept.
local function lua_mask(nh, t, p, seed, key)
  local s0, s1 = split(bit.bxor(fnv1a("attention_dropout"), ffi.cast("uint64_t", key) * 0x9E3779B97F4A7C15ULL))
  local k0, k1 = split(seed)
  return function(b, h, i, j)
    local e = ((b * nh + h) * t + i) * t + j
    local c = math.floor(e / 4)
    local w = {philox(c % TWO32, math.floor(c / TWO32), s0, s1, k0, k1)}
    return w[e % 4 + 1] / TWO32 >= p
  end
end

-- Attention from independent ops: scores [B, H, T, T] with an additive causal/window mask, softmax, then the
-- keep factors `keep` [B, H, T, T] (0 or 1/(1-p)) multiplied in, then P V. (ops_fixture_spec's reference plus
-- the dropout.)
local function reference(q, k, v, scale, window, keep)
  local T, H = q:size(2), q:size(3)
  local KV = k:size(3)
  local rep = {}
  for h = 0, H - 1 do rep[#rep + 1] = math.floor(h / (H / KV)) end
  local idx = fsdp.tensor(rep, {dtype = "i64"})
  local kk, vv = F.index_select(k, 3, idx), F.index_select(v, 3, idx)
  local qh, kh, vh = F.permute(q, 1, 3, 2, 4), F.permute(kk, 1, 3, 2, 4), F.permute(vv, 1, 3, 2, 4)
  local s = F.scale(F.matmul(qh, F.transpose(kh, 3, 4)), scale)
  local mask = fsdp.zeros({T, T}, {dtype = q.dtype})
  for i = 0, T - 1 do
    for j = 0, T - 1 do
      if j > i or (window > 0 and j <= i - window) then mask:set(i * T + j, -1e30) end
    end
  end
  local pr = F.mul(nn.softmax(F.add(s, mask), -1), keep)
  return F.permute(F.matmul(pr, vh), 1, 3, 2, 4)
end

-- Keep factors [B, H, T, T] (f64) from the Lua mask.
local function keep_tensor(B, H, T, p, seed, key)
  local kept = lua_mask(H, T, p, seed, key)
  local m = fsdp.zeros({B, H, T, T}, {dtype = "f64"})
  local d = m:data_ptr("double *")
  for b = 0, B - 1 do
    for h = 0, H - 1 do
      for i = 0, T - 1 do
        for j = 0, i do
          if kept(b, h, i, j) then d[((b * H + h) * T + i) * T + j] = 1 / (1 - p) end
        end
      end
    end
  end
  return m
end

-- v [B, T, nKV, T] with v[b, j, g, d] = (d == j): then out[b, i, h, j] = (P M / (1-p))[b, h, i, j].
local function one_hot_v(B, T, KV)
  local v = fsdp.zeros({B, T, KV, T}, {dtype = "f64"})
  local d = v:data_ptr("double *")
  for b = 0, B - 1 do
    for j = 0, T - 1 do
      for g = 0, KV - 1 do d[((b * T + j) * KV + g) * T + j] = 1 end
    end
  end
  return v
end

-- Which visible probabilities a call of shape (B, T, H heads, KV kv heads) kept: {n = visible count, kept = count,
-- [e] = true for each kept element index e}. q = k = 0 makes P uniform over the visible keys, never 0.
local function revealed(B, T, H, KV, p, seed, key, window)
  local z = fsdp.zeros({B, T, H, T}, {dtype = "f64"})
  local o = nn.attention_dropout(z, fsdp.zeros({B, T, KV, T}, {dtype = "f64"}), one_hot_v(B, T, KV), 0.5, window or 0,
                                 p, seed, key)
  local d = o:data_ptr("double *")
  local r = {n = 0, kept = 0}
  for b = 0, B - 1 do
    for h = 0, H - 1 do
      for i = 0, T - 1 do
        local lo = (window and window > 0) and math.max(0, i - window + 1) or 0
        for j = lo, i do
          r.n = r.n + 1
          if d[((b * T + i) * H + h) * T + j] ~= 0 then
            local e = ((b * H + h) * T + i) * T + j
            r[e] = true
            r.kept = r.kept + 1
          end
        end
      end
    end
  end
  return r
end

-- max |a - b| over all elements (any float dtype, any layout)
local function max_diff(a, b)
  local x, y = F.to(a:detach(), "f64"):contiguous(), F.to(b:detach(), "f64"):contiguous()
  assert.same(x:shape(), y:shape())
  local px, py, d = x:data_ptr("double *"), y:data_ptr("double *"), 0
  for i = 0, x:numel() - 1 do d = math.max(d, math.abs(px[i] - py[i])) end
  return d
end

local seed = 0
local function randn(shape, dtype)
  seed = seed + 1
  local t = fsdp.randn(shape, {dtype = dtype or "f64", seed = seed, name = "attn_dropout"})
  t.requires_grad = true
  return t
end

describe("attention dropout: the op", function()
  it("the Lua Philox used as oracle reproduces Random123's known-answer vectors", function()
    -- Random123 kat_vectors, philox4x32 10 rounds: counter words, key words -> output words
    local kat = {
      {{0, 0, 0, 0, 0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    }
    for _, c in ipairs(kat) do assert.same(c[2], {philox(unpack(c[1]))}) end
  end)

  for _, case in ipairs {
    {"MHA", 2, 9, 3, 3, 4, 0, 0.3},
    {"GQA 4/2 with window 3", 1, 10, 4, 2, 5, 3, 0.5},
    {"T across two 64-row query blocks", 1, 70, 2, 1, 4, 0, 0.1},
  } do
    local name, B, T, H, KV, hd, window, p = unpack(case)
    it(name .. ": forward and gradients equal softmax, the Lua mask and P V composed by hand (f64)", function()
      local q, k, v = randn({B, T, H, hd}), randn({B, T, KV, hd}), randn({B, T, KV, hd})
      local u = fsdp.randn({B, T, H, hd}, {dtype = "f64", seed = 99, name = name})
      local scale, sd, key = 1 / math.sqrt(hd), 17, 5 * TWO32 + 3   -- a key as rank 5, call 3 makes it
      local o = nn.attention_dropout(q, k, v, scale, window, p, sd, key)
      F.backward(F.sum(F.mul(o, u)))
      local g = {q.grad, k.grad, v.grad}
      q.grad, k.grad, v.grad = nil, nil, nil
      local r = reference(q, k, v, scale, window, keep_tensor(B, H, T, p, sd, key))
      F.backward(F.sum(F.mul(r, u)))
      -- f64, the same O(T) sums in two orders (and D_i = rowsum(dO O) for rowsum(P dP)): ~1e-15 relative;
      -- one wrong mask bit moves an output by O(0.1)
      local function near(a, b, what) local d = max_diff(a, b); assert.is_true(d < 1e-10, ("%s: %g"):format(what, d)) end
      near(r, o, "out")
      near(q.grad, g[1], "dq")
      near(k.grad, g[2], "dk")
      near(v.grad, g[3], "dv")
    end)
  end

  it("a one-hot v shows P M / (1-p): kept entries are the un-dropped softmax over 1-p, the rest 0", function()
    local B, T, H, p = 1, 12, 2, 0.4
    local q, k = randn({B, T, H, T}), randn({B, T, H, T})
    local o = nn.attention_dropout(q, k, one_hot_v(B, T, H), 0.3, 0, p, 4, 9)
    local pr = reference(q, k, one_hot_v(B, T, H), 0.3, 0, fsdp.ones({B, H, T, T}, {dtype = "f64"}))  -- plain P
    local kept = lua_mask(H, T, p, 4, 9)
    local od, pd = o:data_ptr("double *"), pr:contiguous():data_ptr("double *")
    local dropped, rowsum_ok = 0, true
    for h = 0, H - 1 do
      for i = 0, T - 1 do
        local sum = 0
        for j = 0, T - 1 do
          local x, e = od[(i * H + h) * T + j], pd[(i * H + h) * T + j]
          sum = sum + e
          if j <= i and kept(0, h, i, j) then
            assert.is_true(math.abs(x - e / (1 - p)) < 1e-12, ("(%d, %d, %d) kept: %g vs %g"):format(h, i, j, x, e / (1 - p)))
          else
            assert.equal(0, x)
            if j <= i then dropped = dropped + 1 end
          end
        end
        rowsum_ok = rowsum_ok and math.abs(sum - 1) < 1e-12   -- the normalisation is of the un-dropped P
      end
    end
    assert.is_true(rowsum_ok)
    assert.is_true(dropped > 0)
  end)

  it("keeps 1 - p of the probabilities, within 5 binomial standard deviations", function()
    local B, T, H, KV = 2, 128, 4, 2
    for _, p in ipairs {0.1, 0.5} do
      local r = revealed(B, T, H, KV, p, 3, 77)
      -- kept ~ Binomial(n, 1-p) if the words are uniform and independent: n = 66048, sigma = sqrt(n p (1-p))
      -- (77 at p = 0.1, 128 at 0.5). The mask is fixed by its key, so this is one deterministic draw that a
      -- biased threshold (an off-by-one in the 2^32 scaling is invisible, but a wrong comparison is 1/2 off) or
      -- a correlated mask would fail.
      local sigma = math.sqrt(r.n * p * (1 - p))
      assert.equal(B * H * T * (T + 1) / 2, r.n)
      assert.is_true(math.abs(r.kept - r.n * (1 - p)) < 5 * sigma,
                     ("p = %g: kept %d of %d, expected %.0f +- %.0f"):format(p, r.kept, r.n, r.n * (1 - p), 5 * sigma))
    end
  end)

  it("masks repeat for the same (seed, key) and are independent across keys (steps, layers, ranks) and seeds", function()
    local B, T, H, p = 1, 64, 4, 0.3
    local base = revealed(B, T, H, H, p, 3, 1)
    local function differing(r)
      local d = 0
      for e in pairs(base) do if type(e) == "number" and not r[e] then d = d + 1 end end
      for e in pairs(r) do if type(e) == "number" and not base[e] then d = d + 1 end end
      return d
    end
    assert.equal(0, differing(revealed(B, T, H, H, p, 3, 1)))
    -- independent masks differ at a fraction 2 p (1-p) = 0.42 of the n = 8320 entries: sigma = sqrt(n 0.42 0.58)
    -- = 45; 5 sigma. Key 2 is the next call (step or layer), 2^32 + 1 the first call of rank 1.
    local n = base.n
    for _, c in ipairs {{3, 2, "next call"}, {3, TWO32 + 1, "rank 1"}, {4, 1, "another seed"}} do
      local d = differing(revealed(B, T, H, H, p, c[1], c[2]))
      assert.is_true(math.abs(d - n * 0.42) < 5 * math.sqrt(n * 0.42 * 0.58), ("%s: %d of %d differ"):format(c[3], d, n))
    end
  end)

  local gc_tol = 1e-6   -- as spec/gradcheck_spec.lua: eps 1e-6 in f64 gives ~1e-9 error; a wrong gradient is O(0.1)
  for _, case in ipairs {
    {"causal MHA, p = 0.3", {2, 5, 2, 4}, {2, 5, 2, 4}, 0, 0.3},
    {"GQA 4 query / 2 kv heads, p = 0.5", {1, 6, 4, 3}, {1, 6, 2, 3}, 0, 0.5},
    {"sliding window 2 with GQA, p = 0.2", {1, 7, 2, 3}, {1, 7, 1, 3}, 2, 0.2},
  } do
    local name, qs, ks, window, p = unpack(case)
    it("has gradients that match central differences (f64): " .. name, function()
      local err, gmax = gradcheck(function(q, k, v) return nn.attention_dropout(q, k, v, 0.4, window, p, 11, 123) end,
                                  {randn(qs), randn(ks), randn(ks)})
      assert.is_true(gmax > 0.01, "gradients are all ~0")
      assert.is_true(err < gc_tol, ("max abs error %g"):format(err))
    end)
  end

  it("has a gradcheck on q/k/v narrowed from a fused projection (GPT-2 c_attn views)", function()
    local err = gradcheck(function(qkv)
      local x = F.view(qkv, 2, 4, 6, 3)
      return nn.attention_dropout(F.narrow(x, 3, 1, 2), F.narrow(x, 3, 3, 2), F.narrow(x, 3, 5, 2), nil, 0, 0.25, 2, 8)
    end, {randn({2, 4, 18})})
    assert.is_true(err < gc_tol, ("max abs error %g"):format(err))
  end)

  it("p = 0 is the attention without dropout, bit for bit", function()
    local q, k, v = randn({2, 70, 4, 8}, "f32"), randn({2, 70, 2, 8}, "f32"), randn({2, 70, 2, 8}, "f32")
    local a = nn.attention_dropout(q, k, v, nil, 5, 0, 3, 4)
    local b = nn.attention(q, k, v, nil, 5)
    assert.is_true(bits_equal(a, b))
  end)

  local function run_threads(threads)
    fsdp.set_num_threads(threads)
    local q = fsdp.randn({2, 130, 4, 16}, {seed = 1, name = "q"}); q.requires_grad = true
    local k = fsdp.randn({2, 130, 2, 16}, {seed = 2, name = "k"}); k.requires_grad = true
    local v = fsdp.randn({2, 130, 2, 16}, {seed = 3, name = "v"}); v.requires_grad = true
    local o = nn.attention_dropout(q, k, v, nil, 100, 0.2, 7, 42)
    F.backward(F.sum(F.mul(o, fsdp.randn(o:shape(), {seed = 4, name = "u"}))))
    return o, q.grad, k.grad, v.grad
  end

  it("forward and all gradients are bit-identical with 1 and 2 threads (p = 0.2, GQA, window, 3 query blocks)", function()
    local before = fsdp.get_num_threads()
    local a = {run_threads(1)}
    local b = {run_threads(2)}
    fsdp.set_num_threads(before)
    for i = 1, 4 do assert.is_true(bits_equal(a[i], b[i]), "output " .. i .. " differs") end
  end)

  it("bf16 inputs draw the same mask: the result is the f32 op on the same values, rounded once", function()
    local function mk(s, n) return F.to(fsdp.randn(s, {seed = n, name = "bf"}), "bf16") end
    local q, k, v = mk({1, 20, 4, 8}, 1), mk({1, 20, 2, 8}, 2), mk({1, 20, 2, 8}, 3)
    for _, t in ipairs {q, k, v} do t.requires_grad = true end
    local o = nn.attention_dropout(q, k, v, nil, 0, 0.3, 5, 6)
    assert.equal("bf16", o.dtype)
    local function f32(t) local c = F.to(t:detach(), "f32"); c.requires_grad = true; return c end
    local q2, k2, v2 = f32(q), f32(k), f32(v)
    local o2 = nn.attention_dropout(q2, k2, v2, nil, 0, 0.3, 5, 6)
    assert.is_true(bits_equal(o, F.to(o2:detach(), "bf16")))
    local u = fsdp.randn(o:shape(), {seed = 9, name = "u"})
    F.backward(F.sum(F.mul(F.to(o, "f32"), u)))
    F.backward(F.sum(F.mul(F.to(F.to(o2, "bf16"), "f32"), u)))
    -- the f32 gradients rounded once to bf16, as torch's CPU attention gives
    for i, pair in ipairs {{q, q2}, {k, k2}, {v, v2}} do
      assert.is_true(bits_equal(pair[1].grad, F.to(pair[2].grad, "bf16")), "gradient " .. i)
    end
  end)

  it("rejects p outside [0, 1), naming p", function()
    local q = randn({1, 4, 2, 3})
    assert.matches("attention_dropout: p must be in %[0, 1%), got 1", err_of(nn.attention_dropout, q, q, q, nil, 0, 1, 0, 1))
    assert.matches("attention_dropout: p must be in %[0, 1%), got %-0.1", err_of(nn.attention_dropout, q, q, q, nil, 0, -0.1, 0, 1))
    assert.matches("attention_dropout: p must be in %[0, 1%), got nan", err_of(nn.attention_dropout, q, q, q, nil, 0, 0 / 0, 0, 1))
    -- the engine checks too (the layers' hot path does not check in Lua)
    local lops = require "fsdp.nn.ops"
    assert.matches("attention: dropout p must be in %[0, 1%), got 1.5", err_of(lops.attention, q, q, q, 0.5, 0, 1.5, 0, 1))
    assert.matches("Attention: dropout %(attention_dropout%) must be a number in %[0, 1%), got 1",
                   err_of(fsdp.nn.Attention.new, 8, {num_heads = 2, dropout = 1}))
  end)
end)

-- ---- keys: (seed, rank, call counter) ----

local keys = require "fsdp.dropout_keys"

local function mask_of(y)   -- "0"/"1" per element
  local t = F.to(y:detach(), "f64"):contiguous()
  local p, s = t:data_ptr("double *"), {}
  for i = 0, t:numel() - 1 do s[#s + 1] = p[i] ~= 0 and "1" or "0" end
  return table.concat(s)
end

describe("dropout keys", function()
  it("advance at every dropout call, repeat after set_counter, and carry rank 0 without distributed", function()
    keys.set_counter(0)
    assert.equal(1, keys.next())
    assert.equal(2, keys.next())
    assert.equal(2, keys.counter())
    assert.equal(0, keys.seed())                     -- this process has no run seed (fsdp.init{seed =})
    local d = fsdp.nn.Dropout.new(0.5)
    local x = fsdp.ones({256})
    keys.set_counter(10)
    local a, b = mask_of(d(x)), mask_of(d(x))
    assert.equal(12, keys.counter())
    assert.are_not.equal(a, b)                       -- two calls (steps, layers): two masks
    keys.set_counter(10)
    assert.equal(a, mask_of(d(x)))                   -- the same sequence of calls: the same masks
    assert.equal(a, mask_of(F.dropout(x, 0.5, 0, 11)))  -- call 11 of rank 0 is key 11, with seed 0
    d:eval()
    assert.is_true(d(x) == x)
    assert.equal(11, keys.counter())                 -- eval draws no key
    assert.matches("set_counter: n must be an integer in %[0, 2%^32%), got %-1", err_of(keys.set_counter, -1))
  end)

  it("give every rank its own masks on real ranks (2 ranks): key = rank * 2^32 + call", function()
    local D = require "dist"
    local res = D.run(2, "spec/workers/dropout_ranks.lua", {}, {timeout = 60})
    assert.is_true(res.code == 0 and not res.timed_out, res.output)
    local r = D.results(res)
    assert.are_not.equal(r[1].dropout, r[2].dropout)
    assert.are_not.equal(r[1].attention, r[2].attention)
    for rank = 0, 1 do
      local x = r[rank + 1]
      assert.equal(2, x.calls)
      assert.equal(3, x.seed)   -- fsdp.init{seed = 3}
      assert.equal(rank * TWO32 + 2, x.attention_key)
      -- the rank's masks are what one process draws with that rank's keys
      assert.equal(mask_of(F.dropout(fsdp.ones({512}), 0.5, 3, rank * TWO32 + 1)), x.dropout)
      local kept = lua_mask(1, 16, 0.5, 3, rank * TWO32 + 2)
      local s = {}
      for i = 0, 15 do for j = 0, 15 do s[#s + 1] = (j <= i and kept(0, 0, i, j)) and "1" or "0" end end
      assert.equal(table.concat(s), x.attention)
    end
  end)
end)

-- ---- activation checkpointing replays the masks ----

local function small_model(kind, over)
  local cfg
  if kind == "gpt2" then
    cfg = {vocab_size = 101, n_positions = 32, n_embd = 32, n_layer = 2, n_head = 4}   -- HF's dropouts: 0.1
  else
    cfg = {vocab_size = 101, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4,
           num_key_value_heads = 2, max_position_embeddings = 32, attention_dropout = 0.1}
  end
  for k, v in pairs(over or {}) do cfg[k] = v end
  return fsdp.models.build(fsdp.models.config(kind, cfg), {seed = 7})
end

local function batch(B, T, s)
  local ids = fsdp.empty({B, T}, {dtype = "i64"})
  local p, x = ids:data_ptr("int64_t *"), s
  for j = 0, B * T - 1 do x = (x * 1103515245 + 12345) % 2147483648; p[j] = math.floor(x / 65536) % 101 end
  return ids
end

-- One forward/backward in train mode from dropout call `start`; returns the loss and name -> gradient bytes.
local function grads(model, ids, start)
  keys.set_counter(start)
  model:zero_grad()
  local out = model(ids, {labels = ids})
  out.loss:backward()
  local g = {}
  for name, p in model:named_parameters() do g[name] = ffi.string(p.grad:contiguous():data_ptr(), p:numel() * 4) end
  return out.loss:item(), g, keys.counter()
end

local function checkpointed(model)
  for _, m in model:named_modules() do if m.is_block then rawset(m, "checkpoint", true) end end
  return model
end

describe("activation checkpointing with dropout", function()
  for _, c in ipairs {
    {"gpt2", {attn_pdrop = 0}, "GPT-2, embedding and residual dropout 0.1"},
    {"gpt2", {}, "GPT-2 with Hugging Face's dropouts (embedding, residual, attention 0.1)"},
    {"llama", {}, "Llama with attention_dropout 0.1 (GQA)"},
  } do
    local kind, over, name = unpack(c)
    it(name .. ": gradients with checkpointed blocks equal the plain gradients bit for bit", function()
      local ids = batch(2, 16, 5)
      local l1, g1, n1 = grads(small_model(kind, over), ids, 100)
      local l2, g2, n2 = grads(checkpointed(small_model(kind, over)), ids, 100)
      assert.equal(l1, l2)
      assert.equal(n1, n2)   -- the recompute replayed its keys and put the counter back
      local count = 0
      for pname, b in pairs(g1) do
        assert.is_true(b == g2[pname], pname .. " differs with checkpointing")
        count = count + 1
      end
      assert.is_true(count > 10)
      -- and the masks matter: other keys give other gradients, so the equality above is not vacuous
      local _, g3 = grads(checkpointed(small_model(kind, over)), ids, 200)
      local differ = 0
      for pname, b in pairs(g1) do if b ~= g3[pname] then differ = differ + 1 end end
      assert.is_true(differ > 0.5 * count, ("only %d of %d gradients depend on the masks"):format(differ, count))
    end)
  end
end)

-- ---- the layers and the models ----

describe("attention dropout in the layers", function()
  -- the layer's output in train mode from dropout call `start`
  local function run(layer, x, start)
    keys.set_counter(start)
    return fsdp.no_grad(function() return layer(x) end)
  end

  for _, c in ipairs {
    {"GPT2Attention", function(p) return fsdp.nn.GPT2Attention.new(16, {n_head = 2, attn_pdrop = p, seed = 1}) end},
    {"Attention (Llama, GQA)", function(p)
      return fsdp.nn.Attention.new(16, {num_heads = 4, num_kv_heads = 2, dropout = p, seed = 1})
    end},
  } do
    local name, make = unpack(c)
    it(name .. " drops probabilities in training mode with a fresh key per call; eval equals p = 0", function()
      local layer, plain = make(0.3), make(0)
      layer:materialize{seed = 3}; plain:materialize{seed = 3}
      local x = fsdp.randn({2, 9, 16}, {seed = 4, name = "x"})
      local a, b = run(layer, x, 0), run(layer, x, 0)
      assert.is_true(bits_equal(a, b))                  -- the same key: the same output
      assert.is_false(bits_equal(a, run(layer, x, 1)))  -- the next call: another mask
      assert.is_false(bits_equal(a, run(plain, x, 0)))  -- dropout is really on
      keys.set_counter(0)
      layer:eval()
      local e1 = fsdp.no_grad(function() return layer(x) end)
      assert.equal(0, keys.counter())                   -- eval draws no key
      assert.is_true(bits_equal(e1, fsdp.no_grad(function() return layer(x) end)))
      assert.is_true(bits_equal(e1, run(plain, x, 0)))  -- eval is exactly the p = 0 attention
    end)
  end

  it("GPT-2 from its Hugging Face defaults (dropouts 0.1) trains in train mode; eval logits are deterministic", function()
    local cfg = fsdp.models.config("gpt2", {vocab_size = 101, n_positions = 32, n_embd = 32, n_layer = 2, n_head = 4})
    assert.equal(0.1, cfg.attn_pdrop)
    assert.equal(0.1, cfg.resid_pdrop)
    assert.equal(0.1, cfg.embd_pdrop)
    local model = fsdp.models.build(cfg, {seed = 7})
    local ids = batch(4, 16, 3)
    local opt = fsdp.optim.AdamW(model:parameters(), {lr = 3e-3})
    keys.set_counter(0)
    local losses = {}
    for step = 1, 20 do
      local out = model(ids, {labels = ids})
      out.loss:backward()
      opt:step()
      opt:zero_grad()
      losses[step] = out.loss:item()
      assert.is_true(losses[step] == losses[step] and math.abs(losses[step]) < math.huge, "step " .. step .. " not finite")
    end
    -- ln(101) = 4.6 at the start; 20 AdamW steps on one repeated batch memorise it by far more than the noise
    -- dropout adds to a step's loss (a few percent)
    local first, last = 0, 0
    for i = 1, 5 do first, last = first + losses[i] / 5, last + losses[15 + i] / 5 end
    assert.is_true(last < first - 0.5, ("loss %.3f -> %.3f"):format(first, last))
    assert.is_true(losses[20] < losses[1])
    -- train-mode losses at fixed weights differ call to call (the masks do); eval is deterministic
    local l1 = fsdp.no_grad(function() return model(ids, {labels = ids}).loss:item() end)
    local l2 = fsdp.no_grad(function() return model(ids, {labels = ids}).loss:item() end)
    assert.are_not.equal(l1, l2)
    model:eval()
    local e1 = fsdp.no_grad(function() return model(ids).logits end)
    local e2 = fsdp.no_grad(function() return model(ids).logits end)
    assert.is_true(bits_equal(e1, e2))
  end)

  -- One training step of a model with dropout on, with `threads` threads; returns loss, norm and weight bytes.
  local function step_with(kind, threads)
    fsdp.set_num_threads(threads)
    local model = small_model(kind)
    local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2, weight_decay = 0.1})
    local ids = batch(4, 32, 11)
    keys.set_counter(0)
    local out = model(ids, {labels = ids})
    out.loss:backward()
    local norm = fsdp.optim.clip_grad_norm(model:parameters(), 1.0)
    opt:step()
    local bytes = {}
    for name, p in model:named_parameters() do bytes[name] = ffi.string(p:data_ptr(), p:numel() * 4) end
    return out.loss:item(), norm, bytes
  end

  for _, kind in ipairs {"gpt2", "llama"} do
    it(kind .. " with dropout on: a training step is bit-identical with 1 and 2 threads", function()
      local before = fsdp.get_num_threads()
      local l1, n1, w1 = step_with(kind, 1)
      local l2, n2, w2 = step_with(kind, 2)
      fsdp.set_num_threads(before)
      assert.equal(l1, l2)
      assert.equal(n1, n2)
      for name, b in pairs(w1) do assert.is_true(b == w2[name], name .. " differs between 1 and 2 threads") end
    end)
  end
end)
