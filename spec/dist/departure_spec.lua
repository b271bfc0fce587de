-- spec/dist/departure_spec.lua: a rank that leaves the job (its script ends, os.exit(0)) while its peers wait
-- for it in a collective makes them fail within seconds, naming the rank that left and the collective, instead
-- of blocking until the 600 s timeout (engine/dist/comm_queue.c, the departure channel of engine/dist/comm_mpi.c).
local D = require "dist"

local WORKER = "spec/workers/leave_early_worker.lua"

local function run(how)
  local res = D.run(3, WORKER, {how}, {timeout = 60})
  assert.is_false(res.timed_out, how .. ": the job hung:\n" .. res.output)
  assert.are_not.equal(0, res.code, how .. ": the job succeeded:\n" .. res.output)
  -- the grace period is 2 s; startup and teardown of 3 ranks on 2 cores take a few more
  assert.is_true(res.elapsed < 20, ("%s: took %.1f s"):format(how, res.elapsed))
  return res
end

describe("a rank that leaves early", function()
  it("with fewer steps than its peers fails them within seconds, naming it and the collective", function()
    local res = run("finish")
    assert.matches("rank 1 has exited while rank %d waits in all_reduce on group 'world'", res.output)
  end)

  it("by os.exit(0) fails its peers the same way", function()
    local res = run("exit0")
    assert.matches("rank 1 has exited while rank %d waits in all_reduce on group 'world'", res.output)
  end)

  it("does not disturb collectives of groups it is not in, only those it is", function()
    local res = run("subgroup")
    assert.matches("rank 0: subgroup all_reduce gave 2", res.output, 1, true)
    assert.matches("rank 2: subgroup all_reduce gave 2", res.output, 1, true)
    assert.matches("rank 1 has exited while rank %d waits in all_reduce on group 'world'", res.output)
  end)
end)
