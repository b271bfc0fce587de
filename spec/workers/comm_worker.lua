-- spec/workers/comm_worker.lua: every collective on the real ranks of one job; each rank writes what it got and
-- spec/dist/comm_spec.lua compares it with values computed by hand. Usage: fsdp-lua -n N comm_worker.lua DIR
local ffi  = require "ffi"
local fsdp = require "fsdp"
local D    = require "dist"
local dist = fsdp.dist

local dir = arg[1]
fsdp.init{seed = 7, timeout = 30}
local r, n = fsdp.rank(), fsdp.world_size()
local res = {rank = r, size = n}

-- The value rank p holds at element j of the reduction inputs (the spec uses the same formula): quarters of small
-- integers, so every f32 sum of a few of them is exact.
local function v(p, j) return ((p * 7 + j * 3) % 11) - 5 + p * 0.25 end

local function filled(count, f, dtype)
  local t = fsdp.zeros({count}, {dtype = dtype or "f32"})
  for j = 0, count - 1 do t:set(j, f(j)) end
  return t
end

-- all_gather: rank p contributes p*100 + i; out is rank-major.
do
  local out = fsdp.zeros({n, 3})
  dist.all_gather(out, filled(3, function(i) return r * 100 + i end))
  res.all_gather = out:totable()
  local out64 = fsdp.zeros({n * 2}, {dtype = "i64"})
  dist.all_gather(out64, filled(2, function(i) return 2^40 + r * 2 + i end, "i64"))  -- above 2^32: all 8 bytes move
  res.all_gather_i64 = out64:totable()
  -- in place: the input is this rank's block of the output (as FSDP's shard of its flat buffer)
  local flat = fsdp.zeros({n * 3})
  local mine = flat:narrow(1, r * 3 + 1, 3)
  for i = 0, 2 do mine:set(i, r * 100 + i) end
  dist.all_gather(flat, mine)
  res.all_gather_in_place = flat:totable()
  local ok, e = pcall(dist.all_gather, flat, flat:narrow(1, 2, 3))   -- overlapping, but no rank's block
  res.all_gather_overlap = ok and "no error" or e
end

-- reduce_scatter: input of n*4 elements; this rank gets chunk r reduced over ranks.
for _, op in ipairs {"sum", "avg", "max"} do
  local out = fsdp.zeros({4})
  dist.reduce_scatter(out, filled(n * 4, function(j) return v(r, j) end), {op = op})
  res["reduce_scatter_" .. op] = out:totable()
end

-- all_reduce with element counts that do not split evenly (7) and fewer elements than ranks (1).
for _, count in ipairs {7, 1} do
  for _, op in ipairs {"sum", "avg", "max"} do
    local t = filled(count, function(j) return v(r, j) end)
    dist.all_reduce(t, {op = op})
    res[("all_reduce_%s_%d"):format(op, count)] = t:totable()
  end
end
do
  local t = filled(5, function(j) return r * 10 + j end, "i64")
  dist.all_reduce(t, {op = "sum"})
  res.all_reduce_i64 = t:totable()
end

-- bf16 / f16 sums accumulate in f32: rank 0 holds 256 (bf16) / 2048 (f16), every other rank 1.
do
  local b = fsdp.full({3}, r == 0 and 256 or 1, {dtype = "bf16"})
  dist.all_reduce(b)
  res.bf16_sum = b:totable()
  local h = fsdp.full({3}, r == 0 and 2048 or 1, {dtype = "f16"})
  dist.all_reduce(h)
  res.f16_sum = h:totable()
  local out = fsdp.zeros({2}, {dtype = "bf16"})
  dist.reduce_scatter(out, fsdp.full({2 * n}, r == 0 and 256 or 1, {dtype = "bf16"}), {op = "sum"})
  res.bf16_reduce_scatter = out:totable()
  local avg = fsdp.full({2}, r == 0 and 256 or 1, {dtype = "bf16"})
  dist.all_reduce(avg, {op = "avg"})
  res.bf16_avg = avg:totable()
end

-- broadcast from root 1 (f32) and from root 0 (i64).
do
  local t = r == 1 and fsdp.tensor({1.5, -2.25, 3}) or fsdp.zeros({3})
  dist.broadcast(t, 1)
  res.broadcast_root1 = t:totable()
  local u = r == 0 and fsdp.tensor({7, 8}, {dtype = "i64"}) or fsdp.zeros({2}, {dtype = "i64"})
  dist.broadcast(u, 0)
  res.broadcast_root0 = u:totable()
end

-- send/recv ring: rank p sends {p, p + 0.5} to p+1 and receives from p-1. The send is async so that no rank blocks
-- before posting its receive.
do
  local nxt, prv = (r + 1) % n, (r - 1 + n) % n
  local got = fsdp.zeros({2})
  local w = dist.send(fsdp.tensor({r, r + 0.5}), nxt, {tag = 5, async = true})
  dist.recv(got, prv, {tag = 5})
  w:wait()
  res.ring = got:totable()
  -- tags keep two messages between the same pair apart: received by tag, whatever the send order
  if r == 0 then
    dist.send(fsdp.tensor({1}), 1, {tag = 1})
    dist.send(fsdp.tensor({2}), 1, {tag = 2})
  elseif r == 1 then
    local a, b = fsdp.zeros({1}), fsdp.zeros({1})
    local wb = dist.recv(b, 0, {tag = 2, async = true})
    dist.recv(a, 0, {tag = 1})
    wb:wait()
    res.tags = {a:item(), b:item()}
  end
end

-- Async overlap: a 4 MB all_gather is issued, then this rank computes without any MPI call, only reading the
-- work's completion flag between slices of compute: only a communication thread can have progressed it
-- (Open MPI's non-blocking collectives move only inside MPI calls). Rank 0 issues 0.2 s late, so the other ranks
-- really compute while their collective waits for it.
do
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } comm_worker_timespec;
    int clock_gettime(int clk, comm_worker_timespec *ts);
  ]]
  local ts = ffi.new("comm_worker_timespec")
  local function wall() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + 1e-9 * tonumber(ts.tv_nsec) end
  local function compute(seconds)
    local a, steps, t0 = fsdp.randn({64, 64}, {seed = r}), 0, wall()
    while wall() - t0 < seconds do a = a:matmul(a) * 0.01; steps = steps + 1 end
    return steps
  end
  local k = 1024 * 1024
  local src = fsdp.full({k}, r + 1)
  local out = fsdp.zeros({n * k})
  if r == 0 then compute(0.2) end
  local w = dist.all_gather(out, src, {async = true})
  -- compute in 0.1 s slices, looking only at the completion flag (no MPI call), for up to 30 s: on a loaded
  -- machine the communication thread may need more than one slice, but it must finish while we compute
  res.overlap_steps = 0
  for _ = 1, 300 do
    res.overlap_steps = res.overlap_steps + compute(0.1)
    if w:is_completed() then break end
  end
  res.overlap_completed = w:is_completed()
  w:wait()
  local ok = true
  for p = 0, n - 1 do
    if out:get(p * k) ~= p + 1 or out:get(p * k + k - 1) ~= p + 1 then ok = false end
  end
  res.overlap_data_ok = ok
  -- a second async collective issued while the first is outstanding completes in issue order
  local t1, t2 = fsdp.full({2}, r), fsdp.full({2}, 1)
  local w1 = dist.all_reduce(t1, {async = true})
  local w2 = dist.all_reduce(t2, {async = true, op = "avg"})
  w2:wait()
  w1:wait()
  res.two_async = {t1:get(0), t2:get(0)}
end

-- Mismatched collectives fail on every rank with a message naming the rank, and the job goes on.
do
  local last = n - 1   -- the differing rank: at 3 ranks, not rank 1, so the message names the right one
  local ok, e = pcall(dist.all_reduce, fsdp.zeros({r == last and 5 or 4}))
  res.mismatch_numel = ok and "no error" or e
  ok, e = pcall(dist.all_gather, fsdp.zeros({n * 2}, {dtype = r == last and "f64" or "f32"}),
                fsdp.zeros({2}, {dtype = r == last and "f64" or "f32"}))
  res.mismatch_dtype = ok and "no error" or e
  ok, e = pcall(dist.all_reduce, fsdp.zeros({2}), {op = r == last and "max" or "sum"})
  res.mismatch_op = ok and "no error" or e
  if r == last then ok, e = pcall(dist.broadcast, fsdp.zeros({2}), 0)
  else ok, e = pcall(dist.all_reduce, fsdp.zeros({2})) end
  res.mismatch_kind = ok and "no error" or e
  ok, e = pcall(dist.world().check, dist.world(), "embed.weight", fsdp.zeros({r == last and 3 or 2, 4}))
  res.mismatch_check = ok and "no error" or e
  ok, e = pcall(dist.world().check, dist.world(), "same", fsdp.zeros({2, 4}))
  res.check_equal = ok and "ok" or e
  -- local argument errors, before any communication
  ok, e = pcall(dist.all_gather, fsdp.zeros({3}), fsdp.zeros({2}))
  res.bad_gather_size = e
  ok, e = pcall(dist.broadcast, fsdp.zeros({2}), n)
  res.bad_root = e
  ok, e = pcall(dist.all_reduce, fsdp.zeros({2}, {dtype = "u8"}))
  res.bad_dtype = e
  ok, e = pcall(dist.all_reduce, fsdp.zeros({2}, {dtype = "i32"}), {op = "avg"})
  res.bad_avg = e
  ok, e = pcall(dist.all_reduce, fsdp.zeros({2}), {op = "mean"})
  res.bad_op = e
  -- still in step afterwards
  local t = fsdp.full({1}, 1)
  dist.all_reduce(t)
  res.after_errors = t:item()
end

-- Splitting: even and odd ranks.
do
  local g = dist.world():split(r % 2, r, r % 2 == 0 and "even" or "odd")
  res.split = {name = g:name(), rank = g:rank(), size = g:size(), ranks = g:ranks()}
  local t = fsdp.full({1}, r)
  g:all_reduce(t)
  res.split_sum = t:item()
end

-- Time accounting, and the bench's skip switch (collectives return at once, data untouched).
do
  res.comm_time_positive = dist.comm_time() > 0
  dist.reset_comm_time()
  res.comm_time_after_reset = dist.comm_time()
  dist.set_skip_comm(true)
  local t = fsdp.full({3}, r + 1)
  dist.all_reduce(t)
  local out = fsdp.full({n}, -1)
  dist.all_gather(out, fsdp.full({1}, r))
  dist.barrier()
  dist.set_skip_comm(false)
  res.skipped = {t:totable(), out:totable()}
end

fsdp.barrier()
res.seed = dist.seed()
D.write(dir, r, res)
