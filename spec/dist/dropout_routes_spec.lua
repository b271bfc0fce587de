-- spec/dist/dropout_routes_spec.lua: "the same run" reached by two routes at 2 ranks draws the same dropout masks.
-- Route A builds on meta (no seed) and shards with apply_plan(model, "auto", {seed = 3}); route B builds with
-- seed 3 on cpu and wraps with fsdp.ddp (spec/workers/dropout_routes.lua, spec/support/dropout_routes.lua). With
-- dropout 0.2 (GPT-2: embedding, residual and attention; Llama: attention) both train 4 AdamW steps to the same
-- losses, gradient norms and final weights, bit for bit; another run seed (fsdp.init{seed =}) moves every loss.
-- FSDP and DDP at the same world size compute the same local gradients and reduce them in the same order (see
-- spec/dist/fsdp_parity_spec.lua), so any difference is a mask.
local ffi  = require "ffi"
local fsdp = require "fsdp"
local D    = require "dist"

local function run(route, kind, run_seed)
  local args = {"route=" .. route, "kind=" .. kind}
  if run_seed then args[#args + 1] = "run_seed=" .. run_seed end
  local res = D.run(2, "spec/workers/dropout_routes.lua", args, {timeout = 180})
  assert(res.code == 0 and not res.timed_out, table.concat(args, " ") .. " failed:\n" .. res.output)
  local ranks = D.results(res)
  assert.same(ranks[1].losses, ranks[2].losses)
  return {report = ranks[1], ranks = ranks, weights = fsdp.safetensors.load(res.dir .. "/weights.safetensors")}
end

local function bytes(t) return ffi.string(t:contiguous():data_ptr(), t:numel() * 4) end

describe("dropout masks at 2 ranks: meta + apply_plan{seed = 3} (FSDP) and build{seed = 3} + fsdp.ddp", function()
  for _, kind in ipairs {"gpt2", "llama"} do
    it(kind .. ": train 4 steps to the same losses, norms and weights, bit for bit", function()
      local a, b = run("fsdp", kind), run("ddp", kind)
      for s = 1, 4 do
        for _, k in ipairs {"losses", "norms"} do
          local x, y = a.report[k][s], b.report[k][s]
          assert.is_true(x == y, ("%s step %d %s: fsdp %.17g vs ddp %.17g"):format(kind, s, k, x, y))
        end
      end
      for r = 1, 2 do assert.equal(a.ranks[r].counter, b.ranks[r].counter) end
      assert.is_true(a.report.counter >= 4)
      local n = 0
      for name, t in pairs(a.weights) do
        assert.is_true(b.weights[name] ~= nil and bytes(t) == bytes(b.weights[name]), kind .. ": " .. name .. " differs")
        n = n + 1
      end
      for name in pairs(b.weights) do assert.is_true(a.weights[name] ~= nil, "ddp has " .. name .. ", fsdp not") end
      assert.is_true(n > 10)
      if kind == "gpt2" then
        -- the masks matter: run seed 9 on the DDP route changes every step's loss
        local c = run("ddp", kind, 9)
        for s = 1, 4 do
          assert.is_true(c.report.losses[s] ~= b.report.losses[s], ("step %d: run seed 9 drew the same masks"):format(s))
        end
      end
    end)
  end
end)
