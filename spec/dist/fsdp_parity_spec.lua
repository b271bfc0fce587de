-- spec/dist/fsdp_parity_spec.lua: the FSDP parity matrix on real ranks. For GPT-2 (tied), Llama (untied) and
-- Llama with tied embeddings, at 2, 3 and 4 ranks with shapes that do not split evenly (vocab 97, hidden 40),
-- every FSDP mode trains 6 AdamW steps at lr 1e-2 with clip_grad_norm(0.25), which clips every step, and is
-- compared with DDP at the same world size and with one rank holding the whole batch: per-step losses, grad
-- norms and every final weight. With dropout 0.1 (masks keyed by seed, rank and call), auto at 2 and 3 ranks is
-- compared with DDP with the same dropout.
local fsdp = require "fsdp"
local D    = require "dist"

local WORKER = "spec/workers/fsdp_parity.lua"
local STEPS, MAX_NORM = 6, "0.25"

-- FSDP and DDP at the same world size are bit-identical: each rank computes the same local gradients from the
-- same gathered weights; reduce-scatter and all-reduce sum over ranks in rank order and divide the same way;
-- the squared norm is summed exactly (engine/core/exact_sum.c) so no split of the shards changes it; and AdamW
-- rounds each shard element as torch rounds it in the whole tensor. So the comparison is exact (0).
-- HSDP sums in two stages ((g0 + g1) + (g2 + g3) over dp_shard then dp_replicate, against DDP's
-- ((g0 + g1) + g2) + g3): a few f32 ulps per step on values of order 1, carried by AdamW: 1e-6.
-- Against one rank with the whole batch, every loss and gradient is a mean over a different split of the
-- batch (f32 partial sums in another order), which AdamW carries over 6 steps. Its first steps divide m by
-- sqrt(v), so an ulp of a tiny gradient moves a weight by up to ~1e-5, and how many ulps depends on the sgemm
-- kernel OpenBLAS picks for the CPU (1.07e-5 seen on one host, < 1e-5 on another): 5e-5, while a wrong shard, a
-- missing reduction or a wrong average is off by 1e-3 or more.
local EXACT, TOL_HSDP, TOL_SINGLE = 0, 1e-6, 5e-5

local cache = {}
local function run(n, model, mode, dropout, aux)
  dropout, aux = dropout or "0", aux or "1"
  local key = ("%d/%s/%s/%s/%s"):format(n, model, mode, dropout, aux)
  if cache[key] then return cache[key] end
  local res = D.run(n, WORKER, {"model=" .. model, "mode=" .. mode, "steps=" .. STEPS, "max_norm=" .. MAX_NORM,
                                "dropout=" .. dropout, "aux=" .. aux}, {timeout = 120})
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

-- Compares two runs; with tol == 0, bit for bit (losses and norms as f64 bits, weights as f32 bits).
local function compare(a, b, tol, what)
  assert.equal(STEPS, #b.report.losses)
  for s = 1, STEPS do
    for _, k in ipairs {"losses", "norms"} do
      local x, y = a.report[k][s], b.report[k][s]
      if tol == 0 then
        assert.is_true(x == y, ("%s: step %d %s %.17g vs %.17g"):format(what, s, k, x, y))
      else
        assert.is_true(max_rel(x, y) <= tol, ("%s: step %d %s %.9g vs %.9g"):format(what, s, k, x, y))
      end
    end
  end
  local count = 0
  for name, wb in pairs(b.weights) do
    local wa = assert(a.weights[name], what .. ": missing weight " .. name)
    assert.same(wb:shape(), wa:shape())
    local n = wa:numel()
    local worst, differ = 0, 0
    local pa, pb = wa:data_ptr("float *"), wb:data_ptr("float *")
    local ua, ub = wa:data_ptr("uint32_t *"), wb:data_ptr("uint32_t *")
    for i = 0, n - 1 do
      if ua[i] ~= ub[i] then differ = differ + 1 end
      local d = math.abs(pa[i] - pb[i])
      if d > worst then worst = d end
    end
    if tol == 0 then
      assert.is_true(differ == 0, ("%s: %s: %d of %d elements differ (by up to %.3g)"):format(what, name, differ, n, worst))
    else
      assert.is_true(worst <= tol, ("%s: %s differs by %.3g"):format(what, name, worst))
    end
    count = count + 1
  end
  for name in pairs(a.weights) do assert.is_not_nil(b.weights[name], what .. ": extra weight " .. name) end
  assert.is_true(count > 5)
  -- the comparison is only worth something where clipping really changed the gradients
  assert.equal(STEPS, a.report.clipped, what .. ": clip_grad_norm did not clip every step")
end

for _, model in ipairs {"gpt2", "llama", "llama_tied"} do
  describe("FSDP parity, " .. model, function()
    for _, n in ipairs {2, 3, 4} do
      for _, mode in ipairs {"auto", "declared", "manual", "function", "ckpt", "fully_shard"} do
        it(("%s at %d ranks is bit-identical to DDP and matches one rank"):format(mode, n), function()
          local single, ddp, f = run(1, model, "single"), run(n, model, "ddp"), run(n, model, mode)
          compare(f, ddp, EXACT, mode .. " vs ddp")
          compare(f, single, TOL_SINGLE, mode .. " vs 1 rank")
        end)
      end
      it(("mixed precision (bf16 params, f32 reduce) at %d ranks is bit-identical to mixed-precision DDP"):format(n), function()
        -- both compute with bf16 copies of the same f32 masters and average the same bf16 gradients in f32
        compare(run(n, model, "mp"), run(n, model, "ddp_mp"), EXACT, "mp vs ddp mp")
        -- and it really computed in bf16: the f32 run's losses differ at bf16 rounding level (~1e-3)
        local a, b = run(n, model, "mp").report.losses, run(n, model, "auto").report.losses
        assert.is_true(math.abs(a[3] - b[3]) > 1e-5, ("bf16 loss %.9g equals the f32 loss %.9g"):format(a[3], b[3]))
      end)
      it(("2 accumulation micro-steps without sync at %d ranks are bit-identical to DDP's"):format(n), function()
        compare(run(n, model, "accum"), run(n, model, "ddp_accum"), EXACT, "accum vs ddp accum")
        compare(run(n, model, "accum"), run(1, model, "single"), TOL_SINGLE, "accum vs 1 rank")
      end)
      if n <= 3 then
        it(("auto with dropout 0.1 at %d ranks is bit-identical to DDP with dropout 0.1"):format(n), function()
          -- each rank draws the same masks under FSDP and DDP (same seed, rank and sequence of dropout calls)
          local f = run(n, model, "auto", "0.1")
          compare(f, run(n, model, "ddp", "0.1"), EXACT, "auto vs ddp, dropout 0.1")
          -- and dropout was on: every step's loss differs from the run without it
          local a, b = f.report.losses, run(n, model, "auto").report.losses
          for s = 1, STEPS do
            assert.is_true(a[s] ~= b[s], ("step %d: loss %.17g equals the loss without dropout"):format(s, a[s]))
          end
        end)
      end
    end
  end)
end

-- Every other registered model (models/init.lua's registry), tied and untied, joins the matrix by its tiny config
-- alone: at 2 and 3 ranks the auto plan and a manual plan with the feed-forward (MLP or MoE block) as a nested
-- unit are bit-identical to DDP; the auto plan matches one rank; mixed precision, dropout and gradient
-- accumulation at 2 ranks. MoE
-- models compare with one rank without the load-balancing loss (aux=0): each rank's aux loss is over its own
-- tokens, as in transformers under DDP, which one rank with the whole batch does not reproduce.
local OTHERS = {}
for mt in pairs(fsdp.models.registry) do
  if mt ~= "gpt2" and mt ~= "llama" then OTHERS[#OTHERS + 1] = mt end
end
table.sort(OTHERS)
for _, mt in ipairs(OTHERS) do
  local moe = fsdp.models.tiny_config(mt).output_router_logits ~= nil
  for _, tie in ipairs {"untied", "tied"} do
    local model = mt .. "_" .. tie
    describe("FSDP parity, " .. model, function()
      for _, n in ipairs(tie == "untied" and {2, 3} or {2}) do
        it(("auto and manual (nested feed-forward unit) at %d ranks are bit-identical to DDP and match one rank"):format(n), function()
          local ddp = run(n, model, "ddp")
          compare(run(n, model, "auto"), ddp, EXACT, "auto vs ddp")
          compare(run(n, model, "manual"), ddp, EXACT, "manual vs ddp")
          local aux = moe and "0" or "1"
          compare(run(n, model, "auto", "0", aux), run(1, model, "single", "0", aux), TOL_SINGLE, "auto vs 1 rank")
        end)
      end
      if tie == "untied" then
        it("mixed precision, dropout 0.1 and 2 accumulation micro-steps at 2 ranks are bit-identical to DDP's", function()
          compare(run(2, model, "mp"), run(2, model, "ddp_mp"), EXACT, "mp vs ddp mp")
          compare(run(2, model, "auto", "0.1"), run(2, model, "ddp", "0.1"), EXACT, "auto vs ddp, dropout 0.1")
          compare(run(2, model, "accum"), run(2, model, "ddp_accum"), EXACT, "accum vs ddp accum")
        end)
      end
    end)
  end
end

describe("HSDP", function()
  it("2 x 2 at 4 ranks matches DDP at 4 ranks and one rank", function()
    for _, model in ipairs {"gpt2", "llama"} do
      local h = run(4, model, "hsdp")
      compare(h, run(4, model, "ddp"), TOL_HSDP, model .. " hsdp vs ddp")
      compare(h, run(1, model, "single"), TOL_SINGLE, model .. " hsdp vs 1 rank")
    end
  end)
end)
