-- spec/dist/model_suite_spec.lua: what every registered model must do beyond the parity matrix
-- (spec/dist/fsdp_parity_spec.lua), resume (spec/dist/resume_spec.lua) and transformers interop
-- (spec/dist/hf_interop_spec.lua), which all iterate the registry too: sharded under mixed precision (bf16
-- params, f32 reduce) on 2 ranks it memorises a sequence — the loss falls by at least 40% in 40 steps and the model
-- then predicts at least 80% of the sequence's next tokens — as the seed's suite asks of every model.
local D = require "dist"

describe("every registered model", function()
  it("memorises a sequence under FSDP mixed precision at 2 ranks (loss -40% in 40 steps, >= 80% of tokens)", function()
    local res = D.run(2, "spec/workers/memorize_worker.lua", {}, {timeout = 120})
    assert(res.code == 0 and not res.timed_out, res.output)
    local ranks = D.results(res)
    local n = 0
    for mt, r in pairs(ranks[1].models) do
      n = n + 1
      assert.equal("f32", r.param_dtype, mt .. ": the optimizer steps the f32 masters")
      assert.is_true(r.last <= 0.6 * r.first, ("%s: loss %.4f -> %.4f"):format(mt, r.first, r.last))
      assert.is_true(r.right >= 0.8 * r.total, ("%s: %d of %d tokens"):format(mt, r.right, r.total))
      assert.same(r, ranks[2].models[mt], mt .. ": the ranks agree")
    end
    local registered = 0
    for _ in pairs(require("fsdp.models").registry) do registered = registered + 1 end
    assert.equal(registered, n)
  end)
end)
