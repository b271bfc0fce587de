-- spec/dist/comm_spec.lua: collectives on real ranks (spec/workers/comm_worker.lua at 2 and 3 ranks) against
-- values computed here by hand; the timeout abort; and world size 1, which runs in this process without MPI.
local ffi  = require "ffi"
local D    = require "dist"   -- spec/support/dist.lua
local fsdp = require "fsdp"

-- The value rank p holds at element j of the reduction inputs (the worker uses the same formula): quarters of
-- small integers, so every f32 sum of a few of them is exact and sums can be compared bit for bit.
local function v(p, j) return ((p * 7 + j * 3) % 11) - 5 + p * 0.25 end

local f32buf = ffi.new("float[1]")
local function f32(x) f32buf[0] = x; return f32buf[0] end

-- Rounds a positive value to `bits` significant bits, ties to even: bf16 has 8, f16 11.
local function round_bits(x, bits)
  local e = math.floor(math.log(x) / math.log(2))
  local ulp = 2 ^ (e - bits + 1)
  local q = x / ulp
  local fl = math.floor(q)
  local frac = q - fl
  if frac > 0.5 or (frac == 0.5 and fl % 2 == 1) then fl = fl + 1 end
  return fl * ulp
end

local function expected_reduce(n, j, op)
  local s, m = 0, -math.huge
  for p = 0, n - 1 do s = s + v(p, j); m = math.max(m, v(p, j)) end
  if op == "sum" then return s end
  if op == "max" then return m end
  return f32(f32(s) / n)   -- avg: the f32 sum divided by n in f32 (one rounding, as the engine does)
end

local runs = {}
local function run(n)
  if not runs[n] then
    local res = D.run(n, "spec/workers/comm_worker.lua", {}, {timeout = 60})
    assert(res.code == 0, ("comm_worker on %d ranks exited %d:\n%s"):format(n, res.code, res.output))
    runs[n] = D.results(res, n)
    D.cleanup(res)
  end
  return runs[n]
end

for _, n in ipairs {2, 3} do
  describe(("collectives on %d ranks"):format(n), function()
    it("all_gather puts each rank's input at its rank-major offset (f32, all 8 bytes of i64, in place)", function()
      for r, got in ipairs(run(n)) do
        local want, want64 = {}, {}
        for p = 0, n - 1 do
          for i = 0, 2 do want[#want + 1] = p * 100 + i end
          for i = 0, 1 do want64[#want64 + 1] = 2 ^ 40 + p * 2 + i end
        end
        assert.same(want, got.all_gather, "rank " .. (r - 1))
        assert.same(want, got.all_gather_in_place, "rank " .. (r - 1))
        assert.truthy(got.all_gather_overlap:find(("input [3] overlaps output [%d] other than as rank %d's block"):format(3 * n, r - 1), 1, true), got.all_gather_overlap)
        assert.same(want64, got.all_gather_i64, "rank " .. (r - 1))
      end
    end)

    it("reduce_scatter gives rank r chunk r reduced (sum, avg, max)", function()
      for r1, got in ipairs(run(n)) do
        local r = r1 - 1
        for _, op in ipairs {"sum", "avg", "max"} do
          local want = {}
          for i = 0, 3 do want[i + 1] = expected_reduce(n, r * 4 + i, op) end
          assert.same(want, got["reduce_scatter_" .. op], ("rank %d, %s"):format(r, op))
        end
      end
    end)

    it("all_reduce sums, averages and maxes sizes that do not split evenly over the ranks (7 and 1 elements)", function()
      for r1, got in ipairs(run(n)) do
        for _, count in ipairs {7, 1} do
          for _, op in ipairs {"sum", "avg", "max"} do
            local want = {}
            for j = 0, count - 1 do want[j + 1] = expected_reduce(n, j, op) end
            assert.same(want, got[("all_reduce_%s_%d"):format(op, count)], ("rank %d, %s of %d"):format(r1 - 1, op, count))
          end
        end
        local want = {}
        for j = 0, 4 do want[j + 1] = 10 * n * (n - 1) / 2 + n * j end
        assert.same(want, got.all_reduce_i64)
      end
    end)

    it("sums bf16 and f16 in f32, rounding once", function()
      -- rank 0 holds 256 (bf16, 8 significant bits) / 2048 (f16, 11 bits), the others 1 each
      local bf = round_bits(256 + (n - 1), 8)
      local hf = round_bits(2048 + (n - 1), 11)
      if n == 3 then
        -- bf16 additions one rank at a time would round 257 back to 256 twice: f32 accumulation gives 258
        assert.equal(256, round_bits(round_bits(256 + 1, 8) + 1, 8))
        assert.equal(258, bf)
        assert.equal(2050, hf)
      end
      local avg = round_bits(f32((256 + (n - 1)) / n), 8)
      for r1, got in ipairs(run(n)) do
        assert.same({bf, bf, bf}, got.bf16_sum, "rank " .. (r1 - 1))
        assert.same({hf, hf, hf}, got.f16_sum)
        assert.same({bf, bf}, got.bf16_reduce_scatter)
        assert.same({avg, avg}, got.bf16_avg)
      end
    end)

    it("broadcasts from root 1 and from root 0", function()
      for _, got in ipairs(run(n)) do
        assert.same({1.5, -2.25, 3}, got.broadcast_root1)
        assert.same({7, 8}, got.broadcast_root0)
      end
    end)

    it("passes a ring of send/recv, and keeps tags apart", function()
      for r1, got in ipairs(run(n)) do
        local prv = (r1 - 1 - 1 + n) % n
        assert.same({prv, prv + 0.5}, got.ring, "rank " .. (r1 - 1))
      end
      assert.same({1, 2}, run(n)[2].tags)
    end)

    it("completes an async collective while the rank computes, and its wait returns the right data", function()
      for r1, got in ipairs(run(n)) do
        assert.is_true(got.overlap_steps > 0)
        assert.is_true(got.overlap_completed, ("rank %d: the all_gather did not complete during 30 s of compute"):format(r1 - 1))
        assert.is_true(got.overlap_data_ok)
        assert.same({n * (n - 1) / 2, 1}, got.two_async)
      end
    end)

    it("fails a collective whose ranks disagree on every rank, naming the rank and both values, without hanging", function()
      local last = n - 1
      for _, got in ipairs(run(n)) do
        assert.truthy(got.mismatch_numel:find(("all_reduce on group 'world': rank %d has 5 elements but rank 0 has 4"):format(last), 1, true), got.mismatch_numel)
        assert.truthy(got.mismatch_dtype:find(("all_gather on group 'world': rank %d has dtype f64 but rank 0 has f32"):format(last), 1, true), got.mismatch_dtype)
        assert.truthy(got.mismatch_op:find(("rank %d reduces with max but rank 0 with sum"):format(last), 1, true), got.mismatch_op)
        assert.truthy(got.mismatch_kind:find(("rank %d called broadcast while rank 0 called all_reduce"):format(last), 1, true), got.mismatch_kind)
        assert.truthy(got.mismatch_check:find(("embed.weight on group 'world': rank %d has 12 elements but rank 0 has 8"):format(last), 1, true), got.mismatch_check)
        assert.equal("ok", got.check_equal)
        assert.equal(n, got.after_errors)   -- the ranks are still in step
      end
    end)

    it("rejects bad arguments before communicating", function()
      local got = run(n)[1]
      assert.truthy(got.bad_gather_size:find(("output [3] has 3 elements, expected %d ranks x 2"):format(n), 1, true), got.bad_gather_size)
      assert.truthy(got.bad_root:find(("root %d is not a rank of group 'world' (size %d)"):format(n, n), 1, true), got.bad_root)
      assert.truthy(got.bad_dtype:find("cannot reduce u8 tensors", 1, true), got.bad_dtype)
      assert.truthy(got.bad_avg:find("avg needs a floating dtype, got i32", 1, true), got.bad_avg)
      assert.truthy(got.bad_op:find("unknown op 'mean' (valid: sum, avg, max)", 1, true), got.bad_op)
    end)

    it("splits the world by color, naming the groups", function()
      for r1, got in ipairs(run(n)) do
        local r = r1 - 1
        local members, sum = {}, 0
        for p = 0, n - 1 do if p % 2 == r % 2 then members[#members + 1] = p; sum = sum + p end end
        assert.same({name = r % 2 == 0 and "even" or "odd", rank = math.floor(r / 2), size = #members, ranks = members}, got.split)
        assert.equal(sum, got.split_sum)
      end
    end)

    it("accounts collective time, and skips communication when asked (data untouched)", function()
      for r1, got in ipairs(run(n)) do
        assert.is_true(got.comm_time_positive)
        assert.equal(0, got.comm_time_after_reset)
        local minus = {}
        for i = 1, n do minus[i] = -1 end
        assert.same({{r1, r1, r1}, minus}, got.skipped)
        assert.equal(7, got.seed)
      end
    end)
  end)
end

describe("collective timeout", function()
  it("aborts the whole job within seconds, naming the collective, the group and the rank", function()
    -- rank 1 sleeps 30 s instead of entering the all_reduce; the timeout is 1 s
    local res = D.run(2, "spec/workers/comm_timeout_worker.lua", {"1"}, {timeout = 30})
    D.cleanup(res)
    assert.is_false(res.timed_out, res.output)
    assert.are_not.equal(0, res.code)
    assert.truthy(res.stderr:find("[rank 0] fsdp: all_reduce on group 'dp_shard' did not complete after 1 s", 1, true), res.output)
    assert.falsy(res.stdout:find("finished", 1, true), res.output)
    -- 1 s timeout + start-up and the abort: 10 s leaves room for a loaded machine, far below rank 1's 30 s
    assert.is_true(res.elapsed < 10, ("took %.1f s"):format(res.elapsed))
  end)
end)

describe("world size 1 (this process, no mpirun)", function()
  local dist = fsdp.dist

  it("joins without MPI", function()
    fsdp.init{seed = 3, timeout = 5}
    fsdp.init{seed = 3}   -- idempotent
    assert.equal(1, fsdp.world_size())
    assert.equal(0, fsdp.rank())
    assert.equal(3, dist.seed())
    assert.equal(5, dist.world():timeout())
    assert.is_nil(os.getenv("OMPI_COMM_WORLD_SIZE"))
    -- libmpi is linked into the engine (loaded globally by fsdp.core), but never started
    ffi.cdef "int MPI_Initialized(int *flag);"
    local flag = ffi.new("int[1]", -1)
    assert.equal(0, ffi.C.MPI_Initialized(flag))
    assert.equal(0, flag[0])
  end)

  it("runs collectives as copies", function()
    local out = fsdp.zeros({3})
    dist.all_gather(out, fsdp.tensor({1, 2, 3}))
    assert.same({1, 2, 3}, out:totable())
    for _, op in ipairs {"sum", "avg", "max"} do
      local rs = fsdp.zeros({2}, {dtype = "bf16"})
      dist.reduce_scatter(rs, fsdp.tensor({1.5, -3}, {dtype = "bf16"}), {op = op})
      assert.same({1.5, -3}, rs:totable())
      local t = fsdp.tensor({0.1, 7})
      local before = t:totable()
      dist.all_reduce(t, {op = op})
      assert.same(before, t:totable())   -- x / 1 is exact: bitwise the same
    end
    local b = fsdp.tensor({4, 5})
    dist.broadcast(b, 0)
    assert.same({4, 5}, b:totable())
    fsdp.barrier()
    local w = dist.all_reduce(fsdp.ones({2}), {async = true})
    assert.is_true(w:is_completed())
    w:wait()
    assert.has_error(function() w:wait() end, "all_reduce: work already waited")
  end)

  it("reports what one rank cannot do", function()
    local ok, e = pcall(dist.broadcast, fsdp.zeros({1}), 1)
    assert.is_false(ok)
    assert.truthy(e:find("root 1 is not a rank of group 'world' (size 1)", 1, true), e)
    ok, e = pcall(dist.send, fsdp.zeros({1}), 0)
    assert.truthy(e:find("send/recv need mpirun", 1, true), e)
    ok, e = pcall(fsdp.init, {seed = -1})
    assert.truthy(e:find("seed must be an integer", 1, true), e)
    ok, e = pcall(fsdp.init, {timeout = 0})
    assert.truthy(e:find("timeout must be a positive number", 1, true), e)
    ok, e = pcall(fsdp.init, {sed = 1})
    assert.truthy(e:find("unknown option 'sed'", 1, true), e)
  end)

  it("builds one-rank meshes and rejects the others", function()
    local m = fsdp.mesh{dp_shard = -1}
    assert.same({1}, m:shape())
    assert.same({0}, m:coordinate())
    assert.equal("dp_shard", m.dp_shard:group():name())
    local m2 = fsdp.mesh{dp_replicate = 1, dp_shard = -1}
    assert.same({1, 1}, m2:shape())
    assert.same({0}, m2.dp_replicate:ranks())
    local ok, e = pcall(fsdp.mesh, {dp_shard = 2})
    assert.truthy(e:find("mesh: dims dp_shard=2 make 2 ranks, but the world size is 1", 1, true), e)
    ok, e = pcall(fsdp.mesh, {dp_replicate = 2, dp_shard = -1})
    assert.truthy(e:find("cannot infer dim 'dp_shard': world size 1 is not divisible by the other dims (dp_replicate=2 = 2)", 1, true), e)
  end)
end)
