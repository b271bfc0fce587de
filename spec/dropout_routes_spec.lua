-- spec/dropout_routes_spec.lua: dropout masks belong to the run, not to how the model was built. One process:
-- the same model reached by three routes (spec/support/dropout_routes.lua: built on meta and sharded by
-- apply_plan{seed = 3}, built with seed 3 and wrapped by fsdp.ddp, built with seed 3 alone) trains 4 steps with
-- dropout on to the same losses, gradient norms and weights, bit for bit; a run seed (fsdp.init{seed =}) changes
-- the masks of every route alike. The 2-rank comparison is spec/dist/dropout_routes_spec.lua.
local ffi    = require "ffi"
local fsdp   = require "fsdp"
local routes = require "dropout_routes"

local STEPS = 4

-- At one rank FSDP's reduce-scatter and DDP's all-reduce copy the gradient, and the gradient norm is summed
-- exactly (engine/core/exact_sum.c), so each route computes the same numbers in the same order: equal bits.
local function same(a, b, what)
  for s = 1, STEPS do
    assert.is_true(a.losses[s] == b.losses[s], ("%s: step %d loss %.17g vs %.17g"):format(what, s, a.losses[s], b.losses[s]))
    assert.is_true(a.norms[s] == b.norms[s], ("%s: step %d norm %.17g vs %.17g"):format(what, s, a.norms[s], b.norms[s]))
  end
  assert.equal(a.counter, b.counter)
  local n = 0
  for name, t in pairs(a.weights) do
    local u = assert(b.weights[name], what .. ": no weight " .. name)
    assert.is_true(ffi.string(t:contiguous():data_ptr(), t:numel() * 4) == ffi.string(u:contiguous():data_ptr(), u:numel() * 4),
                   what .. ": " .. name .. " differs")
    n = n + 1
  end
  for name in pairs(b.weights) do assert.is_true(a.weights[name] ~= nil, what .. ": extra weight " .. name) end
  assert.is_true(n > 10)
end

describe("dropout masks are the run's, whatever route built the model (1 process)", function()
  local runs = {}
  for _, kind in ipairs {"gpt2", "llama"} do
    it(kind .. ": meta + apply_plan{seed = 3}, build{seed = 3} + fsdp.ddp and build{seed = 3} train alike", function()
      local single = routes.train("single", kind, STEPS)
      same(routes.train("fsdp", kind, STEPS), single, kind .. " fsdp vs single")
      same(routes.train("ddp", kind, STEPS), single, kind .. " ddp vs single")
      assert.is_true(single.counter >= STEPS * 2)   -- every step drew masks
      runs[kind] = single
    end)
  end

  it("the run's seed keys the masks: fsdp.init{seed = 5} changes every step's loss, alike on every route", function()
    fsdp.init{seed = 5}
    for _, kind in ipairs {"gpt2", "llama"} do
      local single = routes.train("single", kind, STEPS)
      same(routes.train("fsdp", kind, STEPS), single, kind .. " fsdp vs single, run seed 5")
      assert.is_true(runs[kind] ~= nil, "the first tests ran")
      for s = 1, STEPS do
        assert.is_true(single.losses[s] ~= runs[kind].losses[s], ("%s step %d: the run seed changed no mask"):format(kind, s))
      end
    end
  end)

  it("nn.Dropout takes no seed of its own", function()
    local ok, err = pcall(fsdp.nn.Dropout.new, 0.1, {seed = 3})
    assert.is_false(ok)
    assert.matches("Dropout.new%(p%) takes no options: masks are keyed by the run's seed %(fsdp.init{seed =}%), the "
                   .. "rank and the call", err)
  end)
end)
