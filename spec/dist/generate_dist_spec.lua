-- spec/dist/generate_dist_spec.lua: generate on a sharded model: each step gathers the units as the training
-- forward does; every rank decodes transformers' greedy tokens and the same sampled tokens
-- (spec/workers/generate_worker.lua).
local fsdp = require "fsdp"
local D    = require "dist"

local WORKER = "spec/workers/generate_worker.lua"

local function run(n, plan, fixtures)
  local args = {plan}
  for _, f in ipairs(fixtures) do args[#args + 1] = "spec/fixtures/" .. f end
  local res = D.run(n, WORKER, args, {timeout = 90})
  assert(res.code == 0 and not res.timed_out, res.output)
  return D.results(res)
end

describe("generate on a sharded model", function()
  for _, case in ipairs {{2, "auto", {"gpt2_tied", "qwen2_untied", "mixtral_untied", "phi3_tied"}},
                         {3, "manual", {"llama_untied", "mistral_untied", "qwen3_moe_tied"}}} do
    local n, plan, fixtures = case[1], case[2], case[3]
    it(("at %d ranks (%s plan) decodes transformers' greedy tokens, and samples the same tokens on every rank"):format(n, plan), function()
      local ranks = run(n, plan, fixtures)
      for i, f in ipairs(fixtures) do
        local want = fsdp.safetensors.load("spec/fixtures/" .. f .. "/generate.safetensors").sequences:totable()
        for _, r in ipairs(ranks) do
          local c = r.cases[i]
          assert.is_true(c.sharded, f)
          assert.same(want, c.greedy, ("%s, rank %d"):format(f, r.rank))
          assert.same(ranks[1].cases[i].sampled, c.sampled, ("%s, rank %d: sampled"):format(f, r.rank))
        end
        -- and one process samples the same tokens from the same seed
        local m = fsdp.models.from_pretrained("spec/fixtures/" .. f)
        local g = fsdp.safetensors.load("spec/fixtures/" .. f .. "/generate.safetensors")
        local one = m:generate(g.input_ids, {max_new_tokens = 8, attention_mask = g.attention_mask, eos_token_id = {},
                                             pad_token_id = 0, temperature = 0.9, top_p = 0.95, seed = 11})
        assert.same(one:totable(), ranks[1].cases[i].sampled, f .. ": sampled, 1 process")
      end
    end)
  end
end)
