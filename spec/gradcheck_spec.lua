-- spec/gradcheck_spec.lua: every differentiable engine op against central differences in f64
-- (spec/support/gradcheck.lua), plus bitwise 1-vs-2-thread checks for attention and cross-entropy.
--
-- Tolerance: TOL = 1e-6 for all ops. With eps = 1e-6 in f64 the central difference has truncation error
-- ~eps^2 * |f'''| ~ 1e-12 and rounding error ~1e-16 * |L| / eps ~ 1e-9 for losses |L| ~ 10 (sums over
-- at most a few hundred elements of O(1) values); a wrong gradient is off by O(0.1) or more.
local fsdp = require "fsdp"
local F = fsdp.F
local nn = require "fsdp.ops.nn"
local gradcheck = require("gradcheck").gradcheck

local TOL = 1e-6

local seed = 0
local function randn(shape, opts)
  seed = seed + 1
  local t = fsdp.randn(shape, {dtype = "f64", seed = seed, name = "gc"})
  if not (opts and opts.nograd) then t.requires_grad = true end
  return t
end

-- uniform in [lo, hi): for log/sqrt/rsqrt/pow/div denominators that must stay away from 0
local function positive(shape, lo, hi)
  seed = seed + 1
  local r = fsdp.rand(shape, {dtype = "f64", seed = seed, name = "gc"})
  local t = F.add_scalar(F.scale(r, (hi or 2) - (lo or 0.5)), lo or 0.5)
  t.requires_grad = true
  return t
end

local function ids(list, dtype) return fsdp.tensor(list, {dtype = dtype or "i64"}) end

local function check(name, fn, inputs, tol)
  it(name, function()
    local err, gmax = gradcheck(fn, inputs)
    assert.is_true(gmax > 0, name .. ": all analytic gradients are zero (the check would be vacuous)")
    assert.is_true(err < (tol or TOL), ("%s: max abs error %g (max |grad| %g)"):format(name, err, gmax))
  end)
end

describe("gradcheck itself", function()
  it("detects a wrong gradient (x * detach(x) has autograd gradient x, true gradient 2x)", function()
    local err = gradcheck(function(x) return F.mul(x, F.detach(x)) end, {randn({5})})
    assert.is_true(err > 0.1, ("max abs error %g"):format(err))
  end)
end)

describe("gradcheck: existing ops", function()
  check("add with broadcasting", F.add, {randn({3, 4}), randn({4})})
  check("add with broadcasting on both sides", F.add, {randn({3, 1}), randn({1, 4})})
  check("sub with broadcasting", F.sub, {randn({2, 3, 4}), randn({3, 1})})
  check("mul with broadcasting", F.mul, {randn({3, 4}), randn({3, 1})})
  check("div with broadcasting", F.div, {randn({3, 4}), positive({4})})
  check("add_scaled", function(a, b) return F.add_scaled(a, b, -0.7) end, {randn({5}), randn({5})})
  check("scale", function(a) return F.scale(a, 2.5) end, {randn({4})})
  check("add_scalar", function(a) return F.add_scalar(a, 3) end, {randn({4})})
  check("pow", function(a) return F.pow(a, 2.5) end, {positive({5})})
  check("neg", F.neg, {randn({5})})
  check("exp", F.exp, {randn({5})})
  check("log", F.log, {positive({5})})
  check("sqrt", F.sqrt, {positive({5})})
  check("rsqrt", F.rsqrt, {positive({5})})
  check("tanh", F.tanh, {randn({5})})
  check("sigmoid", F.sigmoid, {randn({5})})
  check("relu", F.relu, {randn({7})})
  check("sum", F.sum, {randn({3, 4})})
  check("mean", F.mean, {randn({3, 4})})
  check("sum_dim", function(a) return F.sum(a, 2) end, {randn({3, 4, 2})})
  check("sum_dim keepdim", function(a) return F.sum(a, 1, true) end, {randn({3, 4})})
  check("mean_dim", function(a) return F.mean(a, -1) end, {randn({3, 4})})
  check("max_dim", function(a) return (F.max(a, 2)) end, {randn({3, 5})})
  check("view", function(a) return F.view(a, 4, 3) end, {randn({3, 4})})
  check("view of a non-contiguous tensor", function(a) return F.view(F.transpose(a, 1, 2), 12) end, {randn({3, 4})})
  check("transpose", function(a) return F.transpose(a, 1, 3) end, {randn({2, 3, 4})})
  check("permute", function(a) return F.permute(a, 3, 1, 2) end, {randn({2, 3, 4})})
  check("narrow", function(a) return F.narrow(a, 2, 2, 2) end, {randn({3, 5})})
  check("expand", function(a) return F.expand(a, 3, 4) end, {randn({1, 4})})
  check("contiguous", function(a) return F.contiguous(F.transpose(a, 1, 2)) end, {randn({3, 4})})
  check("cat", function(a, b) return F.cat({a, b}, 2) end, {randn({2, 3}), randn({2, 2})})
  check("index_select", function(a) return F.index_select(a, 1, ids({2, 0, 2})) end, {randn({3, 4})})
  check("matmul 2-D", F.matmul, {randn({3, 4}), randn({4, 2})})
  check("matmul batched with broadcast", F.matmul, {randn({2, 3, 4}), randn({4, 5})})
  check("matmul batch dims broadcast", F.matmul, {randn({2, 1, 3, 4}), randn({3, 4, 2})})
  check("matmul 1-D x 2-D", F.matmul, {randn({4}), randn({4, 3})})
  check("matmul 2-D x 1-D", F.matmul, {randn({3, 4}), randn({4})})
  check("linear [out, in] with bias", function(x, w, b) return F.linear(x, w, b) end, {randn({2, 3, 4}), randn({5, 4}), randn({5})})
  check("linear [out, in] without bias", function(x, w) return F.linear(x, w) end, {randn({3, 4}), randn({5, 4})})
  check("linear Conv1D [in, out] with bias", function(x, w, b) return F.linear(x, w, b, true) end, {randn({3, 4}), randn({4, 5}), randn({5})})
  check("linear Conv1D [in, out] without bias", function(x, w) return F.linear(x, w, nil, true) end, {randn({2, 2, 4}), randn({4, 5})})
end)

describe("gradcheck: nn ops", function()
  check("layer_norm with weight and bias", function(x, w, b) return nn.layer_norm(x, w, b, 1e-5) end, {randn({3, 6}), randn({6}), randn({6})})
  check("layer_norm without affine", function(x) return nn.layer_norm(x, nil, nil, 1e-5) end, {randn({2, 3, 5})})
  check("rms_norm with weight", function(x, w) return nn.rms_norm(x, w, 1e-6) end, {randn({3, 6}), randn({6})})
  check("rms_norm without weight", function(x) return nn.rms_norm(x, nil, 1e-6) end, {randn({4, 5})})
  check("gelu (erf)", function(x) return nn.gelu(x) end, {randn({9})})
  check("gelu (tanh)", function(x) return nn.gelu(x, "tanh") end, {randn({9})})
  check("silu", nn.silu, {randn({9})})
  check("swiglu", nn.swiglu, {randn({3, 4}), randn({3, 4})})
  check("dropout p=0.3", function(x) return nn.dropout(x, 0.3, 5, 11) end, {randn({40})})
  check("softmax last dim", function(x) return nn.softmax(x, -1) end, {randn({3, 5})})
  check("softmax middle dim", function(x) return nn.softmax(x, 2) end, {randn({2, 4, 3})})
  check("log_softmax last dim", function(x) return nn.log_softmax(x, 2) end, {randn({3, 5})})
  check("log_softmax first dim", function(x) return nn.log_softmax(x, 1) end, {randn({4, 3})})
  check("cross_entropy with ignore_index", function(x) return nn.cross_entropy(x, ids({2, -100, 0, 4}), -100) end, {randn({4, 5})})
  check("cross_entropy with i32 targets", function(x) return nn.cross_entropy(x, ids({1, 3, 0}, "i32")) end, {randn({3, 4})})
  check("embedding with repeated ids", function(w) return nn.embedding(w, ids({{1, 3, 1}, {0, 1, 4}})) end, {randn({5, 3})})
  check("rope, full rotation, default positions", function(x) return nn.rope(x, nil, 10000, 8) end, {randn({2, 3, 2, 8})})
  check("rope, partial rotation, explicit positions", function(x) return nn.rope(x, ids({4, 7, 9}), 500, 4) end, {randn({1, 3, 2, 6})})
  check("rope on a strided view", function(x) return nn.rope(F.transpose(x, 2, 3), nil, 10000, 4) end, {randn({1, 2, 3, 4})})
  check("attention, causal", function(q, k, v) return nn.attention(q, k, v) end, {randn({2, 5, 2, 4}), randn({2, 5, 2, 4}), randn({2, 5, 2, 4})})
  check("attention, GQA (4 query heads, 2 kv heads)", function(q, k, v) return nn.attention(q, k, v, 0.3) end,
        {randn({1, 6, 4, 3}), randn({1, 6, 2, 3}), randn({1, 6, 2, 3})})
  check("attention, sliding window 2", function(q, k, v) return nn.attention(q, k, v, 0.5, 2) end,
        {randn({1, 7, 2, 3}), randn({1, 7, 1, 3}), randn({1, 7, 1, 3})})
  check("attention on q/k/v narrowed from a fused projection (GPT-2 c_attn)", function(qkv)
    local x = F.view(qkv, 2, 4, 6, 3)            -- [B, T, 3*nH, hd], nH = 2
    local q, k, v = F.narrow(x, 3, 1, 2), F.narrow(x, 3, 3, 2), F.narrow(x, 3, 5, 2)
    assert(not q:is_contiguous())
    return nn.attention(q, k, v)
  end, {randn({2, 4, 18})})
  check("attention on views whose last dim is not contiguous (copied once)", function(qt, k, v)
    return nn.attention(F.transpose(qt, 3, 4), k, v)
  end, {randn({1, 4, 3, 2}), randn({1, 4, 2, 3}), randn({1, 4, 2, 3})})
  check("topk", function(x) return (nn.topk(x, 3)) end, {randn({4, 6})})
  check("gather", function(x) return nn.gather(x, 2, ids({{0, 2, 2}, {1, 0, 3}})) end, {randn({2, 4})})
  check("gather along dim 1", function(x) return nn.gather(x, 1, ids({{2, 0}, {1, 1}})) end, {randn({3, 2})})
  check("scatter_add", function(base, src) return nn.scatter_add(base, 2, ids({{0, 2, 2}, {3, 3, 1}}), src) end,
        {randn({2, 4}), randn({2, 3})})
  check("scatter_add with index smaller than src", function(base, src) return nn.scatter_add(base, 1, ids({{1, 0}}), src) end,
        {randn({3, 2}), randn({2, 3})})
end)

describe("determinism across thread counts", function()
  -- Bitwise: each output element must be computed in the same order whatever the thread count.
  local function bits_equal(a, b) return F.sum_squares(F.sub(a, b)) == 0 end

  local function run_attention(threads)
    fsdp.set_num_threads(threads)
    local q = fsdp.randn({2, 130, 4, 16}, {seed = 1, name = "q"}); q.requires_grad = true
    local k = fsdp.randn({2, 130, 2, 16}, {seed = 2, name = "k"}); k.requires_grad = true
    local v = fsdp.randn({2, 130, 2, 16}, {seed = 3, name = "v"}); v.requires_grad = true
    local o = nn.attention(q, k, v)
    F.backward(F.sum(F.mul(o, fsdp.randn(o:shape(), {seed = 4, name = "u"}))))
    return o, q.grad, k.grad, v.grad
  end

  local function run_ce(threads)
    fsdp.set_num_threads(threads)
    local x = fsdp.randn({70, 1000}, {seed = 5, name = "logits"}); x.requires_grad = true
    local t = fsdp.arange(70, {dtype = "i64"})
    local l = nn.cross_entropy(x, t)
    F.backward(l)
    return l, x.grad
  end

  it("attention (forward and all gradients) is bit-identical with 1 and 2 threads", function()
    local before = fsdp.get_num_threads()
    local a = {run_attention(1)}
    local b = {run_attention(2)}
    fsdp.set_num_threads(before)
    for i = 1, 4 do assert.is_true(bits_equal(a[i], b[i]), "output " .. i .. " differs") end
  end)

  it("cross_entropy (loss and dlogits) is bit-identical with 1 and 2 threads", function()
    local before = fsdp.get_num_threads()
    local a = {run_ce(1)}
    local b = {run_ce(2)}
    fsdp.set_num_threads(before)
    assert.equal(a[1]:item(), b[1]:item())
    assert.is_true(bits_equal(a[2], b[2]))
  end)
end)
