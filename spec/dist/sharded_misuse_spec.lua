-- spec/dist/sharded_misuse_spec.lua: a sharded model on real ranks, used the way a user might get wrong:
-- whole-tensor exports of shards, and ranks that disagree on the plan (spec/workers/sharded_misuse_worker.lua).
local fsdp = require "fsdp"
local D    = require "dist"

local WORKER = "spec/workers/sharded_misuse_worker.lua"

local function run(case)
  local res = D.run(3, WORKER, {case}, {timeout = 60})
  assert(res.code == 0 and not res.timed_out, case .. " failed:\n" .. res.output)
  return res, D.results(res)
end

local function same_bits(a, b, what)
  assert.same(a:shape(), b:shape(), what)
  local pa, pb = a:data_ptr("uint32_t *"), b:data_ptr("uint32_t *")
  for i = 0, a:numel() - 1 do
    if pa[i] ~= pb[i] then error(("%s differs at element %d"):format(what, i)) end
  end
end

describe("a sharded model", function()
  local res, ranks = run("save")

  it("save_pretrained writes every rank's rows in place: the file holds the full weights, bit for bit", function()
    local saved = fsdp.safetensors.load(res.dir .. "/ckpt/model.safetensors")
    local full = fsdp.safetensors.load(res.dir .. "/full.safetensors")
    local n = 0
    for name, t in pairs(full) do
      if name ~= "lm_head.weight" then   -- tied: written once, under the embedding's name, as transformers does
        same_bits(t, assert(saved[name], "missing " .. name), name)
        n = n + 1
      end
    end
    for name in pairs(saved) do assert.is_not_nil(full[name], "unexpected " .. name) end
    assert.is_true(n > 10)
    -- and it loads back as the same model in one process
    local m = fsdp.models.from_pretrained(res.dir .. "/ckpt")
    for name, p in m:named_parameters() do same_bits(p, full[name], "reloaded " .. name) end
  end)

  it("refuses to save its shards under the full names, on every rank, writing nothing", function()
    for _, r in ipairs(ranks) do
      assert.is_false(r.shard_save_ok)
      assert.matches("is this rank's FSDP shard", r.shard_save_err, 1, true)
      assert.matches("save model:full_state_dict()", r.shard_save_err, 1, true)
      assert.matches("sharded_misuse_worker.lua:%d+:", r.shard_save_err)   -- the user's line
      assert.is_false(r.shard_file_exists)
    end
  end)

  it("apply_plan with different plans on different ranks fails everywhere, naming the rank, and changes nothing", function()
    local _, rs = run("mismatch")
    for _, r in ipairs(rs) do
      assert.is_false(r.first_ok)
      assert.matches("apply_plan: rank 1 resolved other units than rank 0", r.first_err, 1, true)
      assert.is_false(r.sharded_after_error)
      assert.equal(rs[1].loss, r.loss)   -- the retry sharded and trained
    end
  end)
end)
