-- spec/dist/fsdp_parity_spec.lua: the FSDP parity matrix on real ranks. For GPT-2 (tied), Llama (untied) and
-- Llama with tied embeddings, at 2 and 3 ranks (the tiny shapes do not divide evenly: vocab 101, 2-row
-- dims), every FSDP mode trains 3 AdamW steps and is compared with DDP at the same world size and with one
-- rank holding the whole batch: per-step losses, grad norms and the final weights.
local fsdp = require "fsdp"
local D    = require "dist"

local WORKER = "spec/workers/fsdp_parity.lua"

-- FSDP and DDP at the same world size differ only in how f32 gradients are reduced (reduce-scatter then
-- HSDP all-reduce vs one all-reduce; each sums in rank order) and in the order the squared norm is summed:
-- a few ulps per step on values of order 1, so 1e-6. Against one rank with the whole batch, every loss and
-- gradient is also a mean over a different split of the batch (f32 partial sums in another order), which
-- AdamW carries over 3 steps: 1e-5, while a wrong shard, a missing reduction or a wrong average is off by
-- 1e-3 or more.
local TOL_DDP, TOL_SINGLE = 1e-6, 1e-5

local cache = {}
local function run(n, model, mode)
  local key = ("%d/%s/%s"):format(n, model, mode)
  if cache[key] then return cache[key] end
  local res = D.run(n, WORKER, {"model=" .. model, "mode=" .. mode}, {timeout = 120})
  assert(res.code == 0 and not res.timed_out, key .. " failed:\n" .. res.output)
  local ranks = D.results(res)
  local r = {report = ranks[1], weights = fsdp.safetensors.load(res.dir .. "/weights.safetensors")}
  -- every rank saw the same averaged losses and norms
  for i = 2, #ranks do
    assert.same(ranks[1].losses, ranks[i].losses)
    assert.same(ranks[1].norms, ranks[i].norms)
  end
  cache[key] = r
  return r
end

local function max_rel(a, b)
  return math.abs(a - b) / math.max(1, math.abs(b))
end

local function compare(a, b, tol, what)
  for s = 1, #b.report.losses do
    local dl = max_rel(a.report.losses[s], b.report.losses[s])
    assert.is_true(dl <= tol, ("%s: step %d loss %.9g vs %.9g"):format(what, s, a.report.losses[s], b.report.losses[s]))
    local dn = max_rel(a.report.norms[s], b.report.norms[s])
    assert.is_true(dn <= tol, ("%s: step %d grad norm %.9g vs %.9g"):format(what, s, a.report.norms[s], b.report.norms[s]))
  end
  local count = 0
  for name, wb in pairs(b.weights) do
    local wa = assert(a.weights[name], what .. ": missing weight " .. name)
    assert.same(wb:shape(), wa:shape())
    local worst = 0
    local n = wa:numel()
    local pa, pb = wa:data_ptr("float *"), wb:data_ptr("float *")
    for i = 0, n - 1 do
      local d = math.abs(pa[i] - pb[i])
      if d > worst then worst = d end
    end
    assert.is_true(worst <= tol, ("%s: %s differs by %.3g"):format(what, name, worst))
    count = count + 1
  end
  for name in pairs(a.weights) do assert.is_not_nil(b.weights[name], what .. ": extra weight " .. name) end
  assert.is_true(count > 5)
end

for _, model in ipairs {"gpt2", "llama", "llama_tied"} do
  describe("FSDP parity, " .. model, function()
    for _, n in ipairs {2, 3} do
      for _, mode in ipairs {"auto", "declared", "manual", "function", "ckpt", "fully_shard"} do
        it(("%s at %d ranks matches DDP and one rank"):format(mode, n), function()
          local single, ddp, f = run(1, model, "single"), run(n, model, "ddp"), run(n, model, mode)
          compare(f, ddp, TOL_DDP, mode .. " vs ddp")
          compare(f, single, TOL_SINGLE, mode .. " vs 1 rank")
        end)
      end
      it(("mixed precision (bf16 params, f32 reduce) at %d ranks matches mixed-precision DDP"):format(n), function()
        -- both compute with bf16 copies of the same f32 masters and average the same bf16 gradients in f32
        compare(run(n, model, "mp"), run(n, model, "ddp_mp"), TOL_DDP, "mp vs ddp mp")
        -- and it really computed in bf16: the f32 run's losses differ at bf16 rounding level (~1e-3)
        local a, b = run(n, model, "mp").report.losses, run(n, model, "auto").report.losses
        assert.is_true(math.abs(a[3] - b[3]) > 1e-5, ("bf16 loss %.9g equals the f32 loss %.9g"):format(a[3], b[3]))
      end)
      it(("2 accumulation micro-steps without sync at %d ranks match DDP's"):format(n), function()
        compare(run(n, model, "accum"), run(n, model, "ddp_accum"), TOL_DDP, "accum vs ddp accum")
        compare(run(n, model, "accum"), run(1, model, "single"), TOL_SINGLE, "accum vs 1 rank")
      end)
    end
  end)
end

describe("HSDP", function()
  it("2 x 2 at 4 ranks matches DDP at 4 ranks and one rank", function()
    for _, model in ipairs {"gpt2", "llama"} do
      local h = run(4, model, "hsdp")
      compare(h, run(4, model, "ddp"), TOL_DDP, model .. " hsdp vs ddp")
      compare(h, run(1, model, "single"), TOL_SINGLE, model .. " hsdp vs 1 rank")
    end
  end)
end)
