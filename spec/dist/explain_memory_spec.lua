-- spec/dist/explain_memory_spec.lua: fsdp.explain at W ranks, computed in one process without sharding anything,
-- against what really happens at W ranks (spec/workers/explain_memory_worker.lua): its shard table equals
-- fsdp.shards after apply_plan and every rank's rows and bytes equal the shards the engine made; its memory
-- estimate equals the engine's allocation counters over two AdamW steps.
--
-- How exactly: the counters (engine/core/storage.c) account every storage's bytes as it is allocated and freed, and
-- peaks are high-water marks of those exact sums, so there is no rounding or sampling to allow for. Parameters,
-- gradients and optimizer state are f32 shards, the same bytes every step. The peak of gathered weights (category
-- param_unsharded: the full storages in param_dtype plus the all-gather buffer, ranks x padded chunk) comes from
-- replaying the engine's schedule; step 1 records the unit order (no prefetch), step 2 prefetches one unit ahead in
-- forward and backward. Both steps' peaks must match to the byte.
local D = require "dist"

local WORKER = "spec/workers/explain_memory_worker.lua"

-- the table's text without its first line (explain says "plan", shards "shards ... (this is rank 0)"), without
-- the state shards gives each unit (explain's are all sharded, as apply_plan leaves them), explain's note on a root
-- that holds nothing and the memory estimate that follows explain's table
local function body(text)
  return (text:gsub("\n\nmemory per rank.*$", ""):gsub("\n\n%(root: no parameters left, so no unit%)", "")
              :gsub("^[^\n]*\n", ""):gsub("(\nunit %d+  [^\n]-%])  sharded\n", "%1\n"))
end

describe("fsdp.explain against real ranks", function()
  for _, W in ipairs {2, 3} do
    describe(("at %d ranks"):format(W), function()
      local res, ranks
      setup(function()
        res = D.run(W, WORKER, {}, {timeout = 120})
        assert(res.code == 0 and not res.timed_out, res.output)
        ranks = D.results(res)
      end)
      teardown(function() D.cleanup(res) end)

      it("gives the shard table fsdp.shards shows after sharding, and the rows and bytes each rank holds", function()
        for _, rk in ipairs(ranks) do
          local r = rk.rank
          for _, c in ipairs(rk.cases) do
            assert.same(c.explained, c.shards, c.name)
            assert.equal(#c.held, #c.explained.units, c.name)
            for i, u in ipairs(c.explained.units) do
              for j, p in ipairs(u.params) do
                local h = c.held[i][j]
                local what = ("%s: rank %d: %s"):format(c.name, r, p.name)
                assert.same({h.first_row, h.rows}, p.ranges[r + 1], what)   -- the engine's row0 and shard rows
                assert.equal(h.bytes, p.bytes[r + 1], what)                  -- the shard tensor's bytes
                assert.equal("f32", h.dtype, what)
              end
            end
            if r == 0 then assert.equal(body(c.explain_text), body(c.shards_text), c.name) end
          end
        end
      end)

      it("predicts params, grads and AdamW state exactly, and the peak of gathered weights to the byte", function()
        for _, rk in ipairs(ranks) do
          for _, c in ipairs(rk.cases) do
            local what = ("%s: rank %d"):format(c.name, rk.rank)
            for step = 1, 2 do
              local m = c.measured[step]
              assert.equal(c.predicted.param, m.param, what)
              assert.equal(c.predicted.grad, m.grad, what)      -- f32 gradient shards, after the step
              assert.equal(c.predicted.optim, m.optim, what)    -- exp_avg + exp_avg_sq
              assert.equal(c.predicted.step_peaks[step], m.param_unsharded_peak, what .. ", step " .. step)
              assert.equal(0, m.param_unsharded_after, what)    -- everything resharded after backward
            end
            -- the estimate is the larger: prefetching holds a second unit (the nested plan's keep_full_weight MLPs
            -- already hold more in step 1 than prefetching adds)
            assert.equal(math.max(c.predicted.step_peaks[1], c.predicted.step_peaks[2]), c.predicted.param_unsharded, what)
          end
        end
        -- the printed stats hold the same numbers
        local s = ranks[1].cases[1].measured[2].text
        assert.truthy(s:find("memory (this process)", 1, true), s)
      end)
    end)
  end
end)
