-- spec/nn_spec.lua: the Module base (names, registration order, train/eval, tying, materialise, misuse errors) and
-- the layers checked against a second computation.
local fsdp = require "fsdp"
local nn = require "fsdp.nn"
local F = fsdp.F

local Module = nn.Module

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function max_abs_diff(a, b)
  local x, y = a:totable(), b:totable()
  assert.equal(#x, #y)
  local d = 0
  for i = 1, #x do d = math.max(d, math.abs(x[i] - y[i])) end
  return d
end

-- A two-level toy: an embedding, a list of two Linear "blocks" and a tied head.
local Toy = Module.class("Toy")
function Toy.new(opts)
  local self = Module.init(setmetatable({}, Toy))
  self:register_module("emb", nn.Embedding.new(10, 4, opts))
  local blocks = nn.ModuleList.new()
  for _ = 1, 2 do
    local b = nn.Linear.new(4, 4, opts)
    b.is_block = true
    blocks:append(b)
  end
  self:register_module("blocks", blocks)
  self:register_module("head", nn.Linear.new(4, 10, {bias = false, device = opts and opts.device}))
  self.head:set_parameter("weight", self.emb.weight)
  return self
end

describe("nn.Module", function()
  it("names parameters and modules with dotted names in registration order, tied ones once", function()
    local m = Toy.new()
    local names = {}
    for n in m:named_parameters() do names[#names + 1] = n end
    assert.same({"emb.weight", "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"}, names)
    local mods = {}
    for n in m:named_modules() do mods[#mods + 1] = n end
    assert.same({"", "emb", "blocks", "blocks.0", "blocks.1", "head"}, mods)
    assert.equal(10 * 4 + 2 * (16 + 4), m:num_parameters())
    assert.equal(5, #m:parameters())
    assert.is_true(m.head.weight == m.emb.weight)
    assert.is_true(m.blocks[2] == m.blocks._modules["1"])
    for _, p in ipairs(m:parameters()) do assert.is_true(p.requires_grad) end
  end)

  it("switches train and eval recursively", function()
    local m = Toy.new()
    assert.is_true(m.blocks[1].training)
    m:eval()
    for _, x in m:named_modules() do assert.is_false(x.training) end
    m:train()
    for _, x in m:named_modules() do assert.is_true(x.training) end
  end)

  it("applies a function children first", function()
    local seen = {}
    Toy.new():apply(function(x) seen[#seen + 1] = x.__name end)
    assert.same({"Embedding", "Linear", "Linear", "ModuleList", "Linear", "Toy"}, seen)
  end)

  it("accumulates both uses of a tied weight into one gradient and zero_grad clears it", function()
    local m = Toy.new()
    local ids = fsdp.tensor({{1, 2, 3}}, {dtype = "i64"})
    local h = m.emb(ids)
    local y = m.head(h)
    y:sum():backward()
    -- second path: d/dW of sum(E[ids] W^T) = rows of E via the head, plus sum_j W[j] at the looked-up rows
    local g = m.emb.weight.grad
    assert.is_not_nil(g)
    local w = m.emb.weight:tolist()
    local col = {0, 0, 0, 0}
    for j = 1, 10 do for c = 1, 4 do col[c] = col[c] + w[j][c] end end
    local hs = {0, 0, 0, 0}
    for _, r in ipairs({2, 3, 4}) do for c = 1, 4 do hs[c] = hs[c] + w[r][c] end end
    local gl = g:tolist()
    for r = 1, 10 do
      for c = 1, 4 do
        local expect = hs[c] + ((r >= 2 and r <= 4) and col[c] or 0)
        assert.is_true(math.abs(gl[r][c] - expect) < 1e-5, ("row %d col %d: %g vs %g"):format(r, c, gl[r][c], expect))  -- f32 sums of 10 terms
      end
    end
    m:zero_grad()
    assert.is_nil(m.emb.weight.grad)
  end)

  it("builds on meta without allocating and materialises by full name and seed", function()
    local before = fsdp.C.fl_mem_total_current()
    local m = Toy.new({device = "meta"})
    assert.equal(before, fsdp.C.fl_mem_total_current())
    assert.equal("meta", m.emb.weight.device)
    m:materialize({seed = 7})
    assert.equal("cpu", m.blocks[2].weight.device)
    -- second path: the RNG drawn directly with the parameter's full dotted name
    local want = fsdp.randn({4, 4}, {seed = 7, name = "blocks.1.weight", std = 0.02})
    assert.equal(0, max_abs_diff(want, m.blocks[2].weight))
    assert.same({0, 0, 0, 0}, m.blocks[2].bias:totable())
    local m2 = Toy.new({device = "meta"}):materialize({seed = 7})
    assert.equal(0, max_abs_diff(m.emb.weight, m2.emb.weight))
    local m3 = Toy.new({device = "meta"}):materialize({seed = 8})
    assert.is_true(max_abs_diff(m.emb.weight, m3.emb.weight) > 0)
    assert.matches("unknown option 'sed'", err_of(m.materialize, m, {sed = 1}))
  end)

  it("prints the module tree as PyTorch, with parameter counts", function()
    -- PyTorch folds the two identical blocks into "(0-1): 2 x ..."; counts by hand: emb 10 x 4 = 40, each block
    -- 4 x 4 + 4 = 20, the head holds the tied embedding (40), the whole model each tensor once: 40 + 2 x 20
    local s = tostring(Toy.new())
    assert.equal(table.concat({
      "Toy(  # 80 params",
      "  (emb): Embedding(10, 4)  # 40 params",
      "  (blocks): ModuleList(  # 40 params",
      "    (0-1): 2 x Linear(in_features=4, out_features=4, bias=True)  # 20 params",
      "  )",
      "  (head): Linear(in_features=4, out_features=10, bias=False)  # 40 params",
      ")"}, "\n"), s)
  end)

  it("reports misuse clearly", function()
    local m = Module.init(setmetatable({}, Module.class("M")))
    m:register_parameter("w", fsdp.zeros({2}))
    assert.matches("'w' is already registered", err_of(m.register_parameter, m, "w", fsdp.zeros({2})))
    assert.matches("without dots", err_of(m.register_parameter, m, "a.b", fsdp.zeros({2})))
    assert.matches("must be a tensor", err_of(m.register_parameter, m, "x", 3))
    local nonleaf = fsdp.ones({2}, {requires_grad = true}) * 2
    assert.matches("not a leaf", err_of(m.register_parameter, m, "y", nonleaf))
    assert.matches("must be a module", err_of(m.register_module, m, "c", {}))
    assert.matches("assign parameter 'z' with register_parameter", err_of(function() m.z = fsdp.zeros({1}) end))
    local bare = setmetatable({}, Module.class("Bare"))
    assert.matches("call Module.init", err_of(Module.register_parameter, bare, "w", fsdp.zeros({1})))
    assert.matches("forward is not implemented", err_of(function() return m(fsdp.zeros({1})) end))
    assert.matches("unknown option 'bais'", err_of(nn.Linear.new, 2, 3, {bais = false}))
    assert.matches("Dropout: p must be", err_of(nn.Dropout.new, 1.5))
  end)
end)

describe("nn layers", function()
  it("Linear and Conv1D compute x W^T + b and x W + b", function()
    local x = fsdp.randn({2, 3, 4}, {seed = 1})
    local lin = nn.Linear.new(4, 5, {seed = 2})
    -- second path: matmul with the transposed weight plus the bias
    local ref = F.matmul(x, lin.weight:transpose(1, 2)) + lin.bias
    assert.is_true(max_abs_diff(ref, lin(x)) < 1e-6)  -- same f32 products, possibly another summation order
    local conv = nn.Conv1D.new(4, 5, {seed = 3})
    local ref2 = F.matmul(x, conv.weight) + conv.bias
    assert.is_true(max_abs_diff(ref2, conv(x)) < 1e-6)
    assert.same({4, 5}, conv.weight:shape())
  end)

  it("LayerNorm and RMSNorm normalise the last dim", function()
    local x = fsdp.randn({3, 6}, {seed = 4})
    local ln = nn.LayerNorm.new(6)
    local y = ln(x):tolist()
    local rms = nn.RMSNorm.new(6, {eps = 1e-6})
    local z = rms(x):tolist()
    local xs = x:tolist()
    for r = 1, 3 do
      local mean, var, ms = 0, 0, 0
      for c = 1, 6 do mean = mean + xs[r][c] / 6; ms = ms + xs[r][c] ^ 2 / 6 end
      for c = 1, 6 do var = var + (xs[r][c] - mean) ^ 2 / 6 end
      for c = 1, 6 do
        -- f64 reference of f32 math on 6 elements: 1e-5 covers the rounding
        assert.is_true(math.abs(y[r][c] - (xs[r][c] - mean) / math.sqrt(var + 1e-5)) < 1e-5)
        assert.is_true(math.abs(z[r][c] - xs[r][c] / math.sqrt(ms + 1e-6)) < 1e-5)
      end
    end
  end)

  it("Dropout is the identity in eval mode and with p = 0, and keeps the expectation in training", function()
    local x = fsdp.ones({1000})
    local d = nn.Dropout.new(0.25)
    local y = d(x)
    local kept, s = 0, 0
    for _, v in ipairs(y:totable()) do
      if v ~= 0 then kept = kept + 1; assert.is_true(math.abs(v - 1 / 0.75) < 1e-6) end
      s = s + v
    end
    -- 1000 Bernoulli(0.75) draws: 6 standard deviations (~82) around 750
    assert.is_true(math.abs(kept - 750) < 82, "kept " .. kept)
    d:eval()
    assert.is_true(d(x) == x)
    assert.is_true(nn.Dropout.new(0)(x) == x)
  end)
end)
