-- spec/dist/launcher_spec.lua: `fsdp-lua -n N` (engine/cli/main.c) run as a user runs it: what each rank is given
-- (threads, paths, arguments), exit statuses, and how an error on one rank ends the job.
local D = require "dist"   -- spec/support/dist.lua

local function sh(cmd)
  local p = io.popen("cd " .. D.quote(D.root) .. " && " .. cmd .. " 2>&1; echo \"rc=$?\"")
  local s = p:read("*a")
  p:close()
  local body, rc = s:match("^(.*)rc=(%d+)\n$")
  return body, tonumber(rc)
end

local function cores()
  local out = sh("nproc")
  return tonumber(out:match("%d+"))
end

describe("fsdp-lua -n N", function()
  it("gives every rank its rank, the world size, the script's arguments and a share of the cores", function()
    local res = D.run(2, "spec/workers/launch_env_worker.lua", {"alpha", "two words"})
    assert.equal(0, res.code, res.output)
    local ranks = D.results(res, 2)
    D.cleanup(res)
    local per = math.max(1, math.floor(cores() / 2))
    for r = 0, 1 do
      local got = ranks[r + 1]
      assert.equal(r, got.rank)
      assert.equal(2, got.world)
      assert.equal("2", got.mpi)
      assert.equal(tostring(per), got.omp)
      assert.equal(per, got.threads)
      assert.equal("spec/workers/launch_env_worker.lua", got.arg0)
      assert.same({"alpha", "two words"}, got.args)
      assert.equal(3, got.nvarargs)   -- the result dir and the two arguments
      -- FSDP_LUA_PATH points at the lua/ library this executable uses
      assert.is_string(got.lua_path)
      assert.truthy(D.read_file(got.lua_path .. "/fsdp/dist.lua"), got.lua_path)
    end
  end)

  it("keeps OMP_NUM_THREADS when the user set it, and passes -e statements to every rank", function()
    local res = D.run(2, "spec/workers/launch_env_worker.lua", {},
                      {env = {OMP_NUM_THREADS = "3"}, launcher_args = {"-e", D.quote("from_e = 42")}})
    assert.equal(0, res.code, res.output)
    for _, got in ipairs(D.results(res, 2)) do
      assert.equal("3", got.omp)
      assert.equal(3, got.threads)
      assert.equal(42, got.from_e)
    end
    D.cleanup(res)
  end)

  it("runs -n 1 directly, without mpirun", function()
    local res = D.run(1, "spec/workers/launch_env_worker.lua", {"x"})
    assert.equal(0, res.code, res.output)
    local got = D.results(res, 1)[1]
    D.cleanup(res)
    assert.equal(1, got.world)
    assert.is_false(got.mpi)
    assert.same({"x"}, got.args)
  end)

  it("joins a job started by plain mpirun (the multi-node path)", function()
    local dir = D.tmpdir()
    local out, rc = sh(("env -u OMP_NUM_THREADS LUA_PATH=%s timeout 30 mpirun -np 2 --oversubscribe --allow-run-as-root "
      .. "--mca btl self,vader --mca btl_vader_single_copy_mechanism none %s spec/workers/launch_env_worker.lua %s")
      :format(D.quote(D.root .. "spec/support/?.lua;;"), D.quote(D.exe), D.quote(dir)))
    assert.equal(0, rc, out)
    local ranks = D.results(dir, 2)
    D.cleanup(dir)
    assert.same({0, 1}, {ranks[1].rank, ranks[2].rank})
    assert.same({2, 2}, {ranks[1].world, ranks[2].world})
  end)

  it("prints a rank's uncaught error with its traceback prefixed by the rank, and ends the job non-zero", function()
    local res = D.run(2, "spec/workers/launch_error_worker.lua", {}, {timeout = 30})
    D.cleanup(res)
    assert.is_false(res.timed_out, res.output)
    assert.are_not.equal(0, res.code)
    assert.truthy(res.stderr:find("[rank 1] spec/workers/launch_error_worker.lua:7: boom on rank 1", 1, true), res.stderr)
    assert.truthy(res.stderr:find("[rank 1] stack traceback:", 1, true), res.stderr)
    assert.truthy(res.stderr:find("[rank 1] \tspec/workers/launch_error_worker.lua:7: in function 'failing_step'", 1, true), res.stderr)
    assert.falsy(res.output:find("finished", 1, true))
    -- rank 0 was waiting in a barrier (default timeout 600 s): the abort, not the timeout, ended it
    assert.is_true(res.elapsed < 10, ("took %.1f s"):format(res.elapsed))
  end)

  it("propagates os.exit codes: one rank's non-zero code ends the job with it, 0 everywhere is success", function()
    local res = D.run(3, "spec/workers/launch_exit_worker.lua", {"3"}, {timeout = 30})
    D.cleanup(res)
    assert.equal(3, res.code, res.output)
    assert.falsy(res.output:find("finished", 1, true))
    assert.is_true(res.elapsed < 10, ("took %.1f s"):format(res.elapsed))
    res = D.run(2, "spec/workers/launch_exit_worker.lua", {"0", "all"}, {timeout = 30})
    D.cleanup(res)
    assert.equal(0, res.code, res.output)
    assert.truthy(res.stdout:find("rank 1 up", 1, true), res.output)
  end)

  it("rejects a bad rank count and documents -n in --help", function()
    for _, bad in ipairs {"0", "abc", "-2"} do
      local out, rc = sh(D.quote(D.exe) .. " -n " .. bad .. " x.lua")
      assert.equal(2, rc, out)
      assert.truthy(out:find("-n needs a number of ranks >= 1, got '" .. bad .. "'", 1, true), out)
    end
    local out, rc = sh(D.quote(D.exe) .. " -n")
    assert.equal(2, rc, out)
    out, rc = sh(D.quote(D.exe) .. " --help")
    assert.equal(0, rc)
    assert.truthy(out:find("-n N", 1, true), out)
    assert.truthy(out:find("[rank R]", 1, true), out)
  end)
end)
