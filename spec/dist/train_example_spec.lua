-- spec/dist/train_example_spec.lua: `fsdp-lua -n 3 examples/train.lua` trains the demo model sharded with the
-- auto plan over 3 ranks: it exits cleanly, prints from rank 0 only, and the loss falls.
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
