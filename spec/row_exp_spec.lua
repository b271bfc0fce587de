-- spec/row_exp_spec.lua: the one f32 logsumexp (engine/ops/row_exp.h: 16 fixed lanes, the sum in f64) behind
-- softmax, log_softmax, cross_entropy and linear_cross_entropy. The paths must give the same bits wherever they see
-- the same numbers (a strided row and the same row made contiguous; the fused head and the unfused one when
-- their logits are the same bits), stay within f32 rounding of an f64 reference on a vocabulary-sized row, and
-- keep a NaN a NaN.
local fsdp = require "fsdp"
local F    = fsdp.F
local nn   = require "fsdp.ops.nn"       -- softmax, log_softmax, cross_entropy
local head = require "fsdp.nn.ops"       -- linear_cross_entropy

local function randn(shape, seed, scale)
  return fsdp.no_grad(function() return F.scale(fsdp.randn(shape, {seed = seed}), scale or 1) end)
end

describe("row logsumexp", function()
  it("softmax and log_softmax over a middle dim equal the same rows made contiguous, bit for bit", function()
    -- rows of 37: two full blocks of 16 lanes and a tail of 5; inner 3 makes them strided
    local x = randn({2, 37, 3}, 11, 4)
    assert.is_function(nn.softmax)
    assert.is_function(nn.log_softmax)
    for _, f in ipairs {nn.softmax, nn.log_softmax} do
      local strided = f(x, 2)
      local contiguous = F.transpose(f(F.contiguous(F.transpose(x, 2, 3)), 3), 2, 3)
      assert.same(strided:totable(), contiguous:totable())
    end
  end)

  it("cross_entropy and linear_cross_entropy give the same loss bits from the same logits", function()
    -- [40, 97] is one row chunk and one product shape in both paths, so their logits are the same bits
    local h, w = randn({40, 16}, 3), randn({97, 16}, 4, 0.3)
    local t = {}
    for i = 1, 40 do t[i] = i % 9 == 0 and -100 or (i * 7919) % 97 end
    local tg = fsdp.tensor(t, {dtype = "i64"})
    local fused = head.linear_cross_entropy(h, w, tg, -100)
    local ref = nn.cross_entropy(F.linear(h, w, nil, false), tg, -100)
    assert.equal(ref:item(), fused:item())
  end)

  it("a vocabulary-sized f32 row stays within f32 rounding of the f64 softmax and loss", function()
    local V = 50257
    local x = randn({2, V}, 5, 3)
    local x64 = x:to("f64")
    -- x - max is rounded to f32 before the exp: up to half an ulp of |x - max| <= 32 (|x| < 16 here), 1e-6
    -- relative in the exp; the exp itself (~1.4 ulp) and the scaling by 1 / sum add ~3e-7: 2e-6 bounds it
    local p, p64 = nn.softmax(x, 2):totable(), nn.softmax(x64, 2):totable()
    local worst = 0
    for i = 1, #p do worst = math.max(worst, math.abs(p[i] - p64[i]) / p64[i]) end
    assert.is_true(worst < 2e-6, ("softmax relative error %g"):format(worst))
    local tg = fsdp.tensor({17, V - 1}, {dtype = "i64"})
    local l, l64 = nn.cross_entropy(x, tg):item(), nn.cross_entropy(x64, tg):item()
    assert.is_true(math.abs(l - l64) < 1e-6 * math.abs(l64), ("loss %.9g vs f64 %.9g"):format(l, l64))
  end)

  it("a NaN anywhere in a row makes its softmax and its loss NaN; -inf logits only drop out", function()
    local row = {}
    for j = 1, 40 do row[j] = (j % 5) * 0.25 end
    row[23] = 0 / 0
    local x = fsdp.tensor({row})
    for _, v in ipairs(nn.softmax(x, 2):totable()) do assert.is_true(v ~= v) end
    local loss = nn.cross_entropy(x, fsdp.tensor({3}, {dtype = "i64"})):item()
    assert.is_true(loss ~= loss)
    -- -inf entries (masked logits) get probability 0 and leave the others' as without them
    local masked, kept = {}, {}
    for j = 1, 40 do
      masked[j] = j > 20 and -math.huge or row[j]   -- the NaN (23) is among the masked ones
      if j <= 20 then kept[j] = masked[j] end
    end
    local pm, pk = nn.softmax(fsdp.tensor({masked}), 2):totable(), nn.softmax(fsdp.tensor({kept}), 2):totable()
    for j = 1, 20 do assert.is_true(math.abs(pm[j] - pk[j]) <= 1e-7 * pk[j]) end
    for j = 21, 40 do assert.equal(0, pm[j]) end
  end)
end)
