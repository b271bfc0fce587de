-- spec/autograd_spec.lua: the backward engine seen from Lua (order, freeing, retain_graph, accumulation,
-- no_grad, error messages) and activation checkpointing (fsdp.autograd.checkpoint), whose gradients must be
-- bit-identical to the plain graph's: the same ops run on the same values, only later.
local fsdp = require "fsdp"
local ag   = require "fsdp.autograd"
local F    = fsdp.F
local C    = fsdp.C

local function leaf(shape, seed, dtype)
  return fsdp.randn(shape, {dtype = dtype or "f32", seed = seed, name = "autograd_spec", requires_grad = true})
end

local function err_of(f, ...)
  local ok, e = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return tostring(e)
end

-- An MLP-like block (linear, tanh, linear, residual) over parameters it reaches as upvalues.
local function make_block(seed, dtype)
  local p = {
    w1 = leaf({6, 4}, seed, dtype), b1 = leaf({6}, seed + 1, dtype),
    w2 = leaf({4, 6}, seed + 2, dtype), b2 = leaf({4}, seed + 3, dtype),
  }
  p.fn = function(x) return F.linear(F.linear(x, p.w1, p.b1):tanh(), p.w2, p.b2) + x end
  p.list = {"w1", "b1", "w2", "b2"}
  return p
end

local function grads(p, x)
  local r = {x = x.grad:totable()}
  for _, k in ipairs(p.list) do r[k] = p[k].grad:totable() end
  return r
end

local function clear(p, x)
  x.grad = nil
  for _, k in ipairs(p.list) do p[k].grad = nil end
end

describe("backward", function()
  it("runs nodes in reverse creation order, the same on every run", function()
    -- Checkpoint recomputations happen when their node runs, so a log written by them records the order.
    for _ = 1, 2 do
      local log = {}
      local function tagged(name, scale)
        return function(x)
          if fsdp.is_grad_enabled() then log[#log + 1] = name end
          return x * scale
        end
      end
      local x = leaf({3}, 1)
      local a = ag.checkpoint(tagged("a", 2), x)
      local b = ag.checkpoint(tagged("b", 3), x)
      local c = ag.checkpoint(tagged("c", 4), a)   -- depends on a, created last: runs first
      ag.backward((b + c):sum())
      assert.same({"c", "b", "a"}, log)
      -- d/dx sum(3x + 8x) = 11, exact in f32.
      assert.same({11, 11, 11}, x.grad:totable())
    end
  end)

  it("frees saved tensors when a node has run and every node once the outputs are dropped", function()
    collectgarbage(); collectgarbage()
    local nodes0 = ag.live_nodes()
    local mem0 = C.fl_mem_total_current()
    do
      local x, w = leaf({64, 64}, 2), leaf({64, 64}, 3)
      local mem_leaves = C.fl_mem_total_current() - mem0
      local loss = F.matmul(x, w):tanh():sum()   -- tanh saves its [64, 64] output, matmul saves x and w
      collectgarbage(); collectgarbage()          -- the intermediate's Lua handle is gone; the node holds it
      local grew = C.fl_mem_total_current() - mem0 - mem_leaves
      assert.is_true(grew >= 64 * 64 * 4, ("saved activations: %d bytes"):format(tonumber(grew)))
      assert.is_true(ag.live_nodes() > nodes0)
      loss:backward()
      collectgarbage(); collectgarbage()
      -- Only the leaves, their two [64, 64] grads and the 4-byte loss remain (allocations are padded to
      -- 64 bytes, hence the slack of one line).
      local left = C.fl_mem_total_current() - mem0 - mem_leaves
      assert.is_true(left <= 2 * 64 * 64 * 4 + 64, ("after backward: %d bytes"):format(tonumber(left)))
    end
    collectgarbage(); collectgarbage()
    assert.equal(nodes0, ag.live_nodes())
    assert.equal(tonumber(mem0), tonumber(C.fl_mem_total_current()))
  end)

  it("refuses a second backward without retain_graph, naming the node", function()
    local x = leaf({2, 3}, 4)
    local loss = x:tanh():sum()
    loss:backward()
    local msg = err_of(function() loss:backward() end)
    assert.truthy(msg:find("node sum", 1, true), msg)       -- the first node of the graph to run again
    assert.truthy(msg:find("retain_graph", 1, true), msg)
  end)

  it("runs twice with retain_graph and doubles the gradients", function()
    local x = leaf({2, 3}, 5)
    local loss = (x:tanh() * x):sum()
    ag.backward(loss, {retain_graph = true})
    local g1 = x.grad:totable()
    ag.backward(loss)
    local g2 = x.grad:totable()
    for i = 1, #g1 do assert.equal(2 * g1[i], g2[i]) end   -- g + g is exact in binary floating point
  end)

  it("accumulates into .grad across two backward calls", function()
    local x = leaf({5}, 6)
    local ga, gb
    do
      local y = leaf({5}, 6)                                  -- same values as x, separate .grad
      y:tanh():sum():backward(); ga = y.grad
      y.grad = nil
      local sq = y * y
      sq:sum():backward(); gb = y.grad
    end
    x:tanh():sum():backward()
    local sq = x * x
    sq:sum():backward()
    assert.same((ga + gb):totable(), x.grad:totable())      -- one f32 add each way: identical bits
  end)

  it("records nothing under no_grad", function()
    local x = leaf({3, 3}, 7)
    collectgarbage()
    local n0 = ag.live_nodes()
    local y = ag.no_grad(function() return F.matmul(x, x):tanh():sum() end)
    assert.is_false(y.requires_grad)
    assert.is_nil(y.grad_fn)
    assert.equal(n0, ag.live_nodes())
    assert.is_true(ag.is_grad_enabled())                      -- the scope restored the mode
    local z = ag.no_grad(function() return ag.enable_grad(function() return x:tanh() end) end)
    assert.equal("tanh", z.grad_fn)
  end)

  it("needs a gradient for a non-scalar output and names its shape", function()
    local x = leaf({2, 3}, 8)
    local msg = err_of(function() ag.backward(x:tanh()) end)
    assert.truthy(msg:find("[2, 3]", 1, true), msg)
    -- With a gradient it works: d tanh = 1 - tanh^2, checked against the same formula in f64 below.
    local xd = x:to("f64")
    local g = fsdp.ones({2, 3})
    ag.backward(x:tanh(), g)
    local t = xd:tanh():totable()
    local gx = x.grad:totable()
    for i = 1, 6 do assert.is_true(math.abs(gx[i] - (1 - t[i] * t[i])) < 1e-6) end  -- f32 rounding of tanh
  end)

  it("lets only floating-point leaves require grad", function()
    local x = leaf({2}, 9)
    local y = x:tanh()
    local msg = err_of(function() y.requires_grad = false end)
    assert.truthy(msg:find("leaf", 1, true) and msg:find("tanh", 1, true), msg)
    local i = fsdp.tensor({1, 2}, {dtype = "i64"})
    msg = err_of(function() i.requires_grad = true end)
    assert.truthy(msg:find("i64", 1, true), msg)
    msg = err_of(function() ag.backward(fsdp.ones({1})) end)
    assert.truthy(msg:find("does not require grad", 1, true), msg)
  end)
end)

describe("checkpoint", function()
  it("gives bit-identical gradients to the plain block (linear, tanh, linear, residual)", function()
    for _, dtype in ipairs {"f32", "f64"} do
      local p = make_block(20, dtype)
      local x = leaf({3, 4}, 30, dtype)
      -- a loss that is not linear in the output, so the incoming gradient is not all ones
      local plain = p.fn(x)
      ag.backward((plain * plain):sum())
      local want = grads(p, x)
      clear(p, x)
      local ck = ag.checkpoint(p.fn, x)
      assert.equal("checkpoint", ck.grad_fn)
      assert.same(plain:totable(), ck:totable())
      ag.backward((ck * ck):sum())
      assert.same(want, grads(p, x))
    end
  end)

  it("gives bit-identical gradients through a transformer block (norms, RoPE, attention, MLPs, dropout)", function()
    local N = require "fsdp.ops.nn"
    local B, T, H, nH, nKV = 2, 5, 8, 2, 1
    local hd = H / nH
    local w = {
      ln_w = leaf({H}, 200), ln_b = leaf({H}, 201), wq = leaf({nH * hd, H}, 202), wkv = leaf({2 * nKV * hd, H}, 203),
      wo = leaf({H, H}, 204), rms = leaf({H}, 205), gate = leaf({12, H}, 206), up = leaf({12, H}, 207),
      down = leaf({H, 12}, 208), fc = leaf({12, H}, 209), proj = leaf({H, 12}, 210),
    }
    local function block(x)
      local h = N.layer_norm(x, w.ln_w, w.ln_b, 1e-5)
      local q = F.linear(h, w.wq):view(B, T, nH, hd)
      local kv = F.linear(h, w.wkv)
      local k = kv:narrow(3, 1, nKV * hd):view(B, T, nKV, hd)
      local v = kv:narrow(3, nKV * hd + 1, nKV * hd):view(B, T, nKV, hd)
      local a = N.attention(N.rope(q, nil, 10000), N.rope(k, nil, 10000), v):view(B, T, H)
      x = x + N.dropout(F.linear(a, w.wo), 0.1, 7, 1)        -- the mask depends on (seed, key) only
      local r = N.rms_norm(x, w.rms, 1e-6)
      x = x + F.linear(N.swiglu(F.linear(r, w.gate), F.linear(r, w.up)), w.down)
      return x + F.linear(N.gelu(F.linear(r, w.fc), "tanh"), w.proj)
    end
    local x = leaf({B, T, H}, 211)
    local y = block(x)
    ag.backward((y * y):sum())
    local want = {x = x.grad:totable()}
    for k, p in pairs(w) do want[k] = p.grad:totable(); p.grad = nil end
    x.grad = nil
    local cy = ag.checkpoint(block, x)
    assert.same(y:totable(), cy:totable())
    ag.backward((cy * cy):sum())
    local got = {x = x.grad:totable()}
    for k, p in pairs(w) do got[k] = p.grad:totable() end
    assert.same(want, got)
  end)

  it("keeps no intermediate tensors of the block between forward and backward", function()
    local p = make_block(40)
    local x = leaf({256, 4}, 41)
    local pending0 = ag.pending_checkpoints()
    collectgarbage(); collectgarbage()
    local mem0 = C.fl_mem_total_current()
    local y = ag.checkpoint(p.fn, x)
    collectgarbage(); collectgarbage()
    -- Only y's [256, 4] storage is new; the plain graph would also keep the [256, 6] hidden activations.
    assert.equal(256 * 4 * 4, tonumber(C.fl_mem_total_current() - mem0))
    local y2 = p.fn(x)
    collectgarbage(); collectgarbage()
    -- y2 [256, 4] and the [256, 6] tanh output its graph saves (linear2's input, tanh's own output)
    assert.is_true(C.fl_mem_total_current() - mem0 >= 2 * 256 * 4 * 4 + 256 * 6 * 4)
    ag.backward(y:sum() + y2:sum())
    assert.equal(pending0, ag.pending_checkpoints())
  end)

  it("handles several outputs, pass-through values and an unused output", function()
    local p = make_block(50)
    local function two(x)
      local h = F.linear(x, p.w1, p.b1):tanh()
      return F.linear(h, p.w2), "tag", h:sum(), fsdp.tensor({7}, {dtype = "i64"})
    end
    local x = leaf({3, 4}, 51)
    local a, s, b = two(x)
    ag.backward((a * a):sum() + b * 3)
    local want = grads({list = {"w1", "b1", "w2"}, w1 = p.w1, b1 = p.b1, w2 = p.w2}, x)
    clear({list = {"w1", "b1", "w2"}, w1 = p.w1, b1 = p.b1, w2 = p.w2}, x)
    local ca, cs, cb, ci = ag.checkpoint(two, x)
    assert.equal("tag", cs)
    assert.equal("i64", ci.dtype)
    assert.is_false(ci.requires_grad)
    assert.same(b:totable(), cb:totable())
    ag.backward((ca * ca):sum() + cb * 3)
    assert.same(want, grads({list = {"w1", "b1", "w2"}, w1 = p.w1, b1 = p.b1, w2 = p.w2}, x))
    -- Only the first output used: the second's gradient is absent (NULL) and must count as zero.
    clear({list = {"w1", "b1", "w2"}, w1 = p.w1, b1 = p.b1, w2 = p.w2}, x)
    local a2 = two(x)
    ag.backward((a2 * a2):sum())
    local want2 = p.w1.grad:totable()
    p.w1.grad = nil
    local ca2 = ag.checkpoint(two, x)
    ag.backward((ca2 * ca2):sum())
    assert.same(want2, p.w1.grad:totable())
    local _ = s
  end)

  it("gives parameter gradients when its input needs none", function()
    local p = make_block(60)
    local x = fsdp.randn({3, 4}, {seed = 61})
    local y = p.fn(x)
    ag.backward((y * y):sum())
    local want = p.w1.grad:totable()
    p.w1.grad = nil
    local cy = ag.checkpoint(p.fn, x)
    assert.equal("checkpoint", cy.grad_fn)
    ag.backward((cy * cy):sum())
    assert.same(want, p.w1.grad:totable())
    assert.is_nil(x.grad)
  end)

  it("nests, and matches the plain graph bit for bit", function()
    local p, q = make_block(70), make_block(80)
    local function outer(x) return q.fn(ag.checkpoint(p.fn, x)) end
    local x = leaf({2, 4}, 90)
    local y = outer(x)
    ag.backward((y * y):sum())
    local want = {grads(p, x), q.w1.grad:totable()}
    clear(p, x); q.w1.grad = nil
    local cy = ag.checkpoint(outer, x)
    ag.backward((cy * cy):sum())
    assert.same(want, {grads(p, x), q.w1.grad:totable()})
    assert.equal(0, ag.pending_checkpoints())
  end)

  it("runs twice with retain_graph and otherwise names the node", function()
    local p = make_block(100)
    local x = leaf({2, 4}, 101)
    local y = ag.checkpoint(p.fn, x)
    local loss = (y * y):sum()
    ag.backward(loss, {retain_graph = true})
    local g1 = p.w2.grad:totable()
    ag.backward(loss)
    local g2 = p.w2.grad:totable()
    for i = 1, #g1 do assert.equal(2 * g1[i], g2[i]) end
    local msg = err_of(function() ag.backward(loss) end)
    assert.truthy(msg:find("retain_graph", 1, true), msg)
    assert.equal(0, ag.pending_checkpoints())
  end)

  it("reports an error raised while recomputing and leaves the engine usable", function()
    local calls = 0
    local function flaky(x)
      calls = calls + 1
      if calls == 2 then return F.matmul(x, fsdp.ones({5, 5})) end   -- shape error only on recompute
      return x:tanh()
    end
    local x = leaf({2, 3}, 110)
    local y = ag.checkpoint(flaky, x)
    local msg = err_of(function() ag.backward(y:sum()) end)
    assert.truthy(msg:find("matmul", 1, true) and msg:find("[2, 3]", 1, true), msg)
    assert.is_true(ag.is_grad_enabled())
    local z = ag.checkpoint(function(t) return t * 2 end, x)
    ag.backward(z:sum())
    assert.same({2, 2, 2, 2, 2, 2}, x.grad:totable())
  end)

  it("survives a JIT-hot training loop (callbacks never run from a compiled trace)", function()
    local p = make_block(120)
    local x = leaf({2, 4}, 121)
    local ref
    for i = 1, 300 do
      clear(p, x)
      local y = ag.checkpoint(p.fn, x)
      ag.backward((y * y):sum())
      if i == 1 then ref = p.w1.grad:totable() end
    end
    assert.same(ref, p.w1.grad:totable())
    assert.equal(0, ag.pending_checkpoints())
  end)

  it("under no_grad is a plain call", function()
    local p = make_block(130)
    local x = leaf({2, 4}, 131)
    local y = ag.no_grad(ag.checkpoint, p.fn, x)
    assert.is_false(y.requires_grad)
    assert.equal(0, ag.pending_checkpoints())
    assert.truthy(err_of(ag.checkpoint, 42):find("must be a function", 1, true))
  end)
end)
