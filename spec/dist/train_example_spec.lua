-- spec/dist/train_example_spec.lua: `fsdp-lua -n 3 examples/train.lua` trains the demo model sharded with the
-- auto plan over 3 ranks: it exits cleanly, prints from rank 0 only, and the loss falls. Saving, resuming at
-- another world size and exporting: a run stopped at step 3 and resumed on one process prints the losses of the
-- run that went through.
local D = require "dist"

describe("examples/train.lua on 3 ranks", function()
  it("trains with the auto plan and the loss falls", function()
    local res = D.run(3, "examples/train.lua", {"--steps", "24", "--log", "8", "--sample", "20", "--layers", "2",
      "--embd", "64"}, {timeout = 240, no_dir = true})
    assert.equal(0, res.code, res.output)
    assert.truthy(res.stdout:find("on 3 ranks (plan auto)", 1, true), res.stdout)
    local losses = {}
    for l in res.stdout:gmatch("step%s+%d+%s+loss (%d+%.%d+)") do losses[#losses + 1] = tonumber(l) end
    assert.equal(4, #losses, res.stdout)          -- steps 1, 8, 16, 24, printed once (rank 0)
    assert.is_true(losses[1] > 5.0, res.stdout)    -- ln(256) = 5.55 at the start
    assert.is_true(losses[4] < losses[1] - 1.0, res.stdout)
  end)
end)

describe("examples/train.lua with checkpoints", function()

  local SMALL = {"--steps", "6", "--layers", "1", "--embd", "32", "--seq", "32", "--log", "1", "--sample", "10"}
  local function losses(out)
    local t = {}
    for step, l in out:gmatch("step%s+(%d+)%s+loss (%d+%.%d+)") do t[tonumber(step)] = tonumber(l) end
    return t
  end
  local function example(n, extra)
    local args = {unpack(SMALL)}
    for _, a in ipairs(extra) do args[#args + 1] = a end
    local res = D.run(n, "examples/train.lua", args, {timeout = 120, no_dir = true})
    assert.equal(0, res.code, res.output)
    return res.stdout
  end

  it("saves (--save-dir), resumes at another world size (--resume) and exports (--export)", function()
    local ckpt, export = D.tmpdir(), D.tmpdir() .. "/hf"
    -- 2 ranks x 4 stopped after step 3 (the schedule spans 6 steps); 1 process x 8 (the same global batch) resumes
    local a = example(2, {"--batch", "4", "--stop-at", "3", "--save-dir", ckpt})
    assert.truthy(a:find("saved step 3 to " .. ckpt, 1, true), a)
    local b = example(1, {"--batch", "8", "--resume", ckpt, "--export", export})
    assert.truthy(b:find("resumed from " .. ckpt .. " at step 3 (saved on 2 ranks, fsdp)", 1, true), b)
    local c = example(2, {"--batch", "4"})   -- the same 6 steps without a stop
    local la, lb, lc = losses(a), losses(b), losses(c)
    for step = 1, 3 do assert.equal(lc[step], la[step], a .. c) end   -- the same run up to the save
    assert.is_nil(lb[3])
    -- steps 4..6 on one process: the same samples, weights and optimizer state; only the gradient reduction order
    -- differs (relative 1e-7), so the printed 4 decimals agree up to one unit in the last place
    for step = 4, 6 do assert.is_true(math.abs(lb[step] - lc[step]) <= 1.01e-4, b .. c) end
    -- the export is a Hugging Face checkpoint of the trained model
    local model = require("fsdp").models.from_pretrained(export)
    assert.equal(1, model.config.n_layer)
    D.cleanup(ckpt); D.cleanup(export:match("^(.*)/hf$"))
  end)
end)
