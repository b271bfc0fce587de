-- spec/dist/fsdp_memory_spec.lua: memory accounting under FSDP on real ranks — each rank holds exactly its
-- share of the parameters (as fsdp.explain computes it, padding aside), a forward with free_full_weight
-- never holds more than two block units' full weights (the current one and the prefetched one), and
-- nothing stays unsharded after backward.
local D = require "dist"

describe("FSDP memory", function()
  for _, n in ipairs {2, 3} do
    it(("holds each rank's share and at most 2 unsharded blocks at %d ranks"):format(n), function()
      local res = D.run(n, "spec/workers/fsdp_memory.lua", {}, {timeout = 60})
      assert.equal(0, res.code, res.output)
      local total = 0
      for _, r in ipairs(D.results(res)) do
        assert.equal(r.explained_bytes, r.param_bytes)     -- exact: f32 shards, no padding stored
        assert.equal(0, r.unsharded_after_apply)
        -- step 1 records the order (no prefetch yet: 1 block at a time); step 2 prefetches the next block
        assert.equal(1, r.peak_blocks_forward_1)
        assert.equal(2, r.peak_blocks_forward_2)
        for step = 1, 2 do
          assert.equal(0, r["unsharded_bytes_after_backward_" .. step])
          assert.equal(0, r["units_unsharded_after_backward_" .. step])
        end
        total = total + r.param_bytes
      end
      assert.is_true(total > 0)
    end)
  end
end)
