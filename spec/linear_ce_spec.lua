-- spec/linear_ce_spec.lua: the fused head + loss (engine/ops/ops_linear_ce.c) against the unfused path (linear,
-- then cross_entropy over the full logits): loss and gradients over several row chunks, ignored rows, an upstream
-- gradient other than 1, bf16 inputs, bad targets, and the memory it saves.
local fsdp = require "fsdp"
local F    = fsdp.F
local nn   = require "fsdp.nn.ops"
local C    = fsdp.C

local function leaf(shape, dtype, seed, scale)
  local t = fsdp.no_grad(function() return F.scale(fsdp.randn(shape, {dtype = dtype, seed = seed}), scale or 1) end)
  t.requires_grad = true
  return t
end

local function max_abs_diff(a, b)
  local x, y = a:to("f64"):totable(), b:to("f64"):totable()
  assert.equal(#x, #y)
  local d = 0
  for i = 1, #x do d = math.max(d, math.abs(x[i] - y[i])) end
  return d
end

local function targets(n, v, ignore_every)
  local t = {}
  for i = 1, n do t[i] = (ignore_every and i % ignore_every == 0) and -100 or (i * 7919) % v end
  return fsdp.tensor(t, {dtype = "i64"})
end

-- loss and gradients of both paths for h [N, H], w [V, H]
local function both(h, w, tg, upstream)
  local fused = nn.linear_cross_entropy(h, w, tg, -100)
  F.backward(upstream and F.scale(fused, upstream) or fused)
  local fh, fw = h.grad, w.grad
  h.grad, w.grad = nil, nil
  local logits = F.linear(h, w, nil, false)
  local ref = nn.cross_entropy(logits, tg, -100)
  F.backward(upstream and F.scale(ref, upstream) or ref)
  local rh, rw = h.grad, w.grad
  h.grad, w.grad = nil, nil
  return fused, ref, fh, fw, rh, rw
end

describe("linear_cross_entropy", function()
  it("equals linear + cross_entropy in f64 over several row chunks, with ignored rows", function()
    -- V = 65536: 128 rows per chunk, so 300 rows take three chunks, the last one short
    local h, w = leaf({300, 3}, "f64", 1), leaf({65536, 3}, "f64", 2, 0.5)
    local fused, ref, fh, fw, rh, rw = both(h, w, targets(300, 65536, 7))
    -- f64 throughout: the two paths differ only in summation order, ~1e-16 relative
    assert.is_true(math.abs(fused:item() - ref:item()) < 1e-12 * math.abs(ref:item()))
    assert.is_true(max_abs_diff(fh, rh) < 1e-15)
    assert.is_true(max_abs_diff(fw, rw) < 1e-15)
  end)

  it("scales its gradients by the upstream gradient (f32), and is the same bits with 1 and 2 threads", function()
    local h, w = leaf({40, 16}, "f32", 3), leaf({97, 16}, "f32", 4, 0.3)
    local fused, ref, fh, fw, rh, rw = both(h, w, targets(40, 97, 5), 0.5)
    -- f32: exp rounding and another order of the row sums; gradients of order 1e-2
    assert.is_true(math.abs(fused:item() - ref:item()) < 1e-6 * math.abs(ref:item()))
    assert.is_true(max_abs_diff(fh, rh) < 1e-7)
    assert.is_true(max_abs_diff(fw, rw) < 1e-7)
    local bits = {}
    for _, threads in ipairs {1, 2} do
      fsdp.set_num_threads(threads)
      local l = nn.linear_cross_entropy(h, w, targets(40, 97, 5), -100)
      F.backward(l)
      bits[threads] = {l:item(), h.grad:totable(), w.grad:totable()}
      h.grad, w.grad = nil, nil
    end
    fsdp.set_num_threads(2)
    assert.same(bits[1], bits[2])
  end)

  it("takes bf16 inputs (f32 math, f32 loss, bf16 gradients)", function()
    local h32, w32 = leaf({24, 8}, "f32", 5), leaf({50, 8}, "f32", 6, 0.3)
    local h = fsdp.no_grad(function() return h32:to("bf16") end)
    local w = fsdp.no_grad(function() return w32:to("bf16") end)
    h.requires_grad, w.requires_grad = true, true
    local fused, ref, fh, fw, rh, rw = both(h, w, targets(24, 50))
    assert.equal("f32", fused.dtype)
    assert.equal("bf16", fh.dtype)
    assert.equal("bf16", fw.dtype)
    assert.is_true(math.abs(fused:item() - ref:item()) < 1e-3 * math.abs(ref:item()))
    assert.is_true(max_abs_diff(fw, rw) < 1e-3)   -- bf16 rounding of gradients of order 1e-2
  end)

  it("gives NaN over no targets, and names a bad target", function()
    local h, w = leaf({4, 3}, "f32", 7), leaf({5, 3}, "f32", 8)
    local l = nn.linear_cross_entropy(h, w, fsdp.tensor({-100, -100, -100, -100}, {dtype = "i64"}), -100)
    assert.is_true(l:item() ~= l:item())
    local ok, err = pcall(nn.linear_cross_entropy, h, w, fsdp.tensor({0, 1, 5, 2}, {dtype = "i64"}), -100)
    assert.is_false(ok)
    assert.matches("target 5 at row 2 is out of range %[0, 5%)", tostring(err))
    ok, err = pcall(nn.linear_cross_entropy, h, leaf({5, 4}, "f32", 9), fsdp.tensor({0, 1, 2, 3}, {dtype = "i64"}), -100)
    assert.is_false(ok)
    assert.matches("must be %[N, H%] and %[V, H%]", tostring(err))
  end)

  it("never holds the [N, V] logits: its peak stays well below them", function()
    local N, H, V = 2048, 8, 32768   -- logits would be 256 MiB in f32; a chunk is 32 MiB
    local h, w = leaf({N, H}, "f32", 10), leaf({V, H}, "f32", 11, 0.1)
    collectgarbage(); collectgarbage()
    C.fl_mem_reset_peak()
    local before = tonumber(C.fl_mem_total_current())
    local l = nn.linear_cross_entropy(h, w, targets(N, V), -100)
    F.backward(l)
    local peak = tonumber(C.fl_mem_total_peak()) - before
    -- one chunk (32 MiB) plus the gradients of h and w (64 KiB + 1 MiB), never the 256 MiB logits
    assert.is_true(peak < 40 * 2 ^ 20, ("peak %.1f MiB"):format(peak / 2 ^ 20))
  end)
end)
