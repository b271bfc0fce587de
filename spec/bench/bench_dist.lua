-- spec/bench/bench_dist.lua: the distributed part of `make bench`. Trains the bench model of bench.lua (GPT-2,
-- vocab 256, n_positions 256, n_embd 384, 6 layers, 6 heads, seq 256; 10.8M parameters; AdamW lr 3e-4 wd 0.1,
-- clip_grad_norm 1.0) on a global batch of 8 sequences split evenly over the ranks, and measures one setup:
--
--   build/fsdp-lua -n 1 spec/bench/bench_dist.lua --mode single   the whole batch on one rank, no wrapping
--   build/fsdp-lua -n 2 spec/bench/bench_dist.lua --mode ddp      fsdp.ddp (bucketed grad all-reduce)
--   build/fsdp-lua -n 2 spec/bench/bench_dist.lua --mode fsdp     built on meta, fsdp.apply_plan "auto"
--
-- Rank 0 prints one line "BENCH_DIST <json>": global tokens/s and step ms (the slowest rank's), and per rank:
-- communication time per step (the same step's collectives run alone, without compute, after the timed
-- phase), the step time of the same loop with every collective skipped (dist.set_skip_comm: collectives
-- return at once and leave the data untouched, so those steps compute garbage, but their time is what the
-- compute alone costs), peak RSS (VmHWM) and the peak bytes of each memory category (fsdp.memory_stats, peaks
-- reset after warmup). Exposed communication = step time - step time without communication.
--
--   build/fsdp-lua spec/bench/bench_dist.lua --all               (one process; what `make bench` runs)
--
-- runs the three setups above and PyTorch FSDP2 on 2 ranks (spec/reference/bench_torch_fsdp.py, when
-- spec/reference/.venv exists) one after another, each under a wall-clock limit, and prints a summary: the
-- throughput table, our FSDP against PyTorch FSDP2 (tokens/s, peak RSS per rank), FSDP's param + grad + optim
-- bytes per rank as a ratio of DDP's, and the memory-by-category table.
--
-- Options: --mode single|ddp|fsdp | --all; --steps N (timed steps, 5) --warmup N (2) --ranks N (2: ranks of the
-- ddp/fsdp/torch runs under --all) --timeout S (600: wall-clock limit of each run under --all; also the
-- collective timeout of the ranks) --no-torch.
-- Threads: the launcher gives each rank cores / N threads (OMP_NUM_THREADS); --all unsets OMP_NUM_THREADS for the
-- runs it starts so that this holds, and PyTorch gets the same count per rank.
local fsdp = require "fsdp"
local ffi  = require "ffi"
local cjson = require "cjson"

local opts = {mode = nil, all = false, steps = 5, warmup = 2, ranks = 2, timeout = 600, torch = true}
do
  local usage = "valid: --mode single|ddp|fsdp, --all, --steps N, --warmup N, --ranks N, --timeout S, --no-torch"
  local function int_arg(name, v, min)
    local n = tonumber(v)
    if not n or n ~= math.floor(n) or n < min then
      error(("bench_dist: %s needs an integer >= %d, got %s"):format(name, min, tostring(v)), 0)
    end
    return n
  end
  local i = 1
  while arg and arg[i] do
    local a = arg[i]
    if a == "--mode" then
      opts.mode = arg[i + 1]; i = i + 1
      if opts.mode ~= "single" and opts.mode ~= "ddp" and opts.mode ~= "fsdp" then
        error(("bench_dist: unknown mode %s (valid: single, ddp, fsdp)"):format(tostring(opts.mode)), 0)
      end
    elseif a == "--all" then opts.all = true
    elseif a == "--steps" then opts.steps = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--warmup" then opts.warmup = int_arg(a, arg[i + 1], 0); i = i + 1
    elseif a == "--ranks" then opts.ranks = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--timeout" then opts.timeout = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--no-torch" then opts.torch = false
    else error("bench_dist: unknown argument " .. a .. " (" .. usage .. ")", 0) end
    i = i + 1
  end
  if opts.all == (opts.mode ~= nil) then error("bench_dist: pass one of --mode M or --all (" .. usage .. ")", 0) end
  if opts.all and 8 % opts.ranks ~= 0 then
    error(("bench_dist: the global batch 8 does not split evenly over --ranks %d (use 1, 2, 4 or 8)"):format(opts.ranks), 0)
  end
end

local VOCAB, T, B, SEED = 256, 256, 8, 1
local CATEGORIES = {"param", "param_unsharded", "grad", "optim", "activation", "other", "total"}

ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } fl_bench_dist_timespec;
  int clock_gettime(int clk, fl_bench_dist_timespec *ts);
]]
local ts = ffi.new("fl_bench_dist_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

-- ---------------------------------------------------------------------------------------------------------------
-- One setup, on every rank of the job.
-- ---------------------------------------------------------------------------------------------------------------

local function peak_rss_mb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmHWM:%s+(%d+)")
    if kb then return tonumber(kb) / 1024 end
  end
  error("bench_dist: no VmHWM in /proc/self/status")
end

local function run_mode(mode)
  local dist = require "fsdp.dist"
  local F    = require "fsdp.parallel"
  dist.init{seed = SEED, timeout = opts.timeout}
  local rank, world = dist.rank(), dist.world_size()
  if mode == "single" and world ~= 1 then
    error(("bench_dist: --mode single runs on 1 rank, got %d (use -n 1)"):format(world), 0)
  end
  if B % world ~= 0 then
    error(("bench_dist: the global batch %d does not split evenly over %d ranks"):format(B, world), 0)
  end
  local per = B / world

  local cfg = fsdp.models.config("gpt2", {vocab_size = VOCAB, n_positions = T, n_embd = 384, n_layer = 6,
    n_head = 6, resid_pdrop = 0, embd_pdrop = 0, attn_pdrop = 0})
  -- Every setup starts from the same weights: FSDP initialises each rank's rows of the meta parameters as the
  -- full initialisation with the same seed would have them.
  local model = fsdp.models.build(cfg, {device = mode == "fsdp" and "meta" or "cpu", seed = SEED})
  local nparams = 0
  for _, p in ipairs(model:parameters()) do nparams = nparams + p:numel() end
  -- The collectives one step issues, to time them alone: FSDP all-gathers every unit twice (forward and
  -- backward) and reduce-scatters it once; DDP all-reduces the gradients in 25 MB buckets.
  local chunks = {}
  if mode == "fsdp" then
    for _, u in ipairs(require("fsdp.parallel").explain(model, "auto", world).units) do
      chunks[#chunks + 1] = u.padded_numel_per_rank
    end
  end
  if mode == "fsdp" then F.apply_plan(model, "auto", {seed = SEED})
  elseif mode == "ddp" then require("fsdp.parallel.ddp")(model) end
  local params = model:parameters()
  local opt = fsdp.optim.AdamW(params, {lr = 3e-4, weight_decay = 0.1})
  local norm_time = 0   -- get_total_norm's share: the exact squared norm and its all-gather

  -- The global batch of a step (an LCG, its upper bits: the low bits of a power-of-two LCG repeat every 256
  -- draws, which the model would learn); this rank's rows [rank * per, (rank + 1) * per).
  local function batch(step)
    local ids = fsdp.empty({per, T}, {dtype = "i64"})
    local p = ids:data_ptr("int64_t *")
    local x, lo, hi = step * 7919, rank * per * T, (rank + 1) * per * T
    for j = 0, B * T - 1 do
      x = (x * 1103515245 + 12345) % 2147483648
      if j >= lo and j < hi then p[j - lo] = math.floor(x / 65536) % VOCAB end
    end
    return ids
  end

  local function train_step(step)
    local ids = batch(step)
    local out = model(ids, {labels = ids})
    out.loss:backward()
    local tn = now()
    -- clip_grad_norm in its two halves, to time the norm; with collectives skipped it may be NaN: fine
    local norm = fsdp.optim.get_total_norm(params)
    norm_time = norm_time + (now() - tn)
    fsdp.optim.clip_grads_with_norm_(params, 1.0, norm)
    opt:step()
    opt:zero_grad()
    local loss = out.loss:item()
    out.loss:free()
    ids:free()
    return loss
  end

  for s = 1, opts.warmup do train_step(s) end
  F.reset_peak_memory()

  -- Timed phase: each rank times its own loop from a common start; the step time is the slowest rank's.
  dist.barrier()
  dist.reset_comm_time()
  norm_time = 0
  local t0 = now()
  local loss
  for s = 1, opts.steps do loss = train_step(opts.warmup + s) end
  local elapsed = now() - t0
  local elapsed_norm = norm_time
  local mem = F.memory_stats()
  local rss = peak_rss_mb()

  -- The same loop with every collective skipped (1 rank has none to skip).
  local elapsed_nocomm = 0
  if world > 1 then
    dist.barrier()
    dist.set_skip_comm(true)
    local t1 = now()
    for s = 1, opts.steps do train_step(opts.warmup + opts.steps + s) end
    elapsed_nocomm = now() - t1
    dist.set_skip_comm(false)
  end

  -- The same step's collectives alone, no compute: the total communication time of a step.
  local elapsed_commonly = 0
  if world > 1 then
    local ops = {}
    if mode == "fsdp" then
      for _, n in ipairs(chunks) do
        local full, part = fsdp.zeros({n * world}), fsdp.zeros({n})
        ops[#ops + 1] = function() dist.all_gather(full, part) end
        ops[#ops + 1] = function() dist.all_gather(full, part) end
        ops[#ops + 1] = function() dist.reduce_scatter(part, full, {op = "avg"}) end
      end
    else
      local left, cap = nparams, 25 * 1024 * 1024 / 4
      while left > 0 do
        local b = fsdp.zeros({math.min(left, cap)})
        ops[#ops + 1] = function() dist.all_reduce(b, {op = "avg"}) end
        left = left - cap
      end
    end
    dist.barrier()
    local t2 = now()
    for _ = 1, opts.steps do for _, f in ipairs(ops) do f() end end
    elapsed_commonly = now() - t2
  end

  -- Gather every rank's numbers to rank 0 (a fixed-length f64 row per rank).
  local row = {elapsed, elapsed_commonly, elapsed_nocomm, rss, loss, elapsed_norm}
  for _, c in ipairs(CATEGORIES) do row[#row + 1] = mem[c].peak end
  local L = #row
  local mine = fsdp.tensor(row, {dtype = "f64"})
  local all = fsdp.zeros({world * L}, {dtype = "f64"})
  dist.all_gather(all, mine)
  if rank ~= 0 then return end

  local v = all:totable()
  local res = {mode = mode, world = world, threads_per_rank = fsdp.get_num_threads(), steps = opts.steps,
               warmup = opts.warmup, global_batch = B, seq = T, params = nparams,
               comm_ms_per_rank = {}, nocomm_step_ms_per_rank = {}, step_ms_per_rank = {},
               peak_rss_mb_per_rank = {}, memory_peak_bytes_per_rank = {}, grad_norm_ms_per_rank = {}}
  local slowest, slowest_nocomm, comm_sum, loss_sum = 0, 0, 0, 0
  for r = 0, world - 1 do
    local o = r * L
    local e, c, en, m, l = v[o + 1], v[o + 2], v[o + 3], v[o + 4], v[o + 5]
    slowest, slowest_nocomm = math.max(slowest, e), math.max(slowest_nocomm, en)
    comm_sum, loss_sum = comm_sum + c, loss_sum + l
    res.step_ms_per_rank[r + 1] = 1e3 * e / opts.steps
    res.comm_ms_per_rank[r + 1] = 1e3 * c / opts.steps
    res.nocomm_step_ms_per_rank[r + 1] = 1e3 * en / opts.steps
    res.peak_rss_mb_per_rank[r + 1] = m
    local cats = {}
    for k, name in ipairs(CATEGORIES) do cats[name] = v[o + 6 + k] end
    res.grad_norm_ms_per_rank[r + 1] = 1e3 * v[o + 6] / opts.steps
    res.memory_peak_bytes_per_rank[r + 1] = cats
  end
  res.step_ms = 1e3 * slowest / opts.steps
  res.grad_norm_ms = math.max(unpack(res.grad_norm_ms_per_rank))
  res.tokens_per_s = B * T * opts.steps / slowest
  res.comm_ms = 1e3 * comm_sum / world / opts.steps   -- mean over the ranks
  res.last_loss_mean = loss_sum / world
  if world > 1 then
    res.nocomm_step_ms = 1e3 * slowest_nocomm / opts.steps
    res.exposed_comm_ms = res.step_ms - res.nocomm_step_ms
    res.exposed_over_comm = res.comm_ms > 0 and res.exposed_comm_ms / res.comm_ms or 0
  end
  io.write("BENCH_DIST ", cjson.encode(res), "\n")
  io.flush()
end

-- ---------------------------------------------------------------------------------------------------------------
-- --all: the driver, one plain process that starts the runs.
-- ---------------------------------------------------------------------------------------------------------------

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- The repository root (this file is <root>/spec/bench/bench_dist.lua); runs start there.
local ROOT = (debug.getinfo(1, "S").source:match("^@(.*)spec/bench/bench_dist%.lua$") or "")
if ROOT == "" then ROOT = "./" end

-- Runs cmd from the root under the wall-clock limit; returns the JSON object of the line `prefix {...}` (or the
-- first {...} line when prefix is nil), or nil and what went wrong (the end of the output).
local function run_json(label, cmd, prefix)
  local log = os.tmpname()
  -- (LuaJIT's popen close gives no exit status: the shell prints it last)
  local full = ("cd %s && timeout -k 10 %d %s 2>%s; echo \"BENCH_DIST_RC $?\""):format(q(ROOT), opts.timeout, cmd, q(log))
  io.stderr:write(("bench_dist: running %s ...\n"):format(label))
  local t0 = now()
  local h = io.popen(full)
  local out = h:read("*a")
  h:close()
  local code = tonumber(out:match("BENCH_DIST_RC (%d+)%s*$"))
  local f = io.open(log, "r")
  local err = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(log)
  io.stderr:write(("bench_dist: %s took %.0f s\n"):format(label, now() - t0))
  local line
  for l in out:gmatch("[^\n]+") do
    if prefix then
      local rest = l:match("^" .. prefix .. " (%b{})")
      if rest then line = rest end
    elseif l:match("^%b{}$") then
      line = l
    end
  end
  if not line then
    local status = (code == 124 or code == 137) and ("timed out after " .. opts.timeout .. " s")
                   or ("exit status %s"):format(tostring(code))
    local tail = (out:gsub("BENCH_DIST_RC %d+%s*$", "") .. err):sub(-2000)
    return nil, ("%s (%s):\n%s"):format(label, status, tail)
  end
  local okj, res = pcall(cjson.decode, line)
  if not okj then return nil, label .. ": bad JSON: " .. line end
  return res
end

local function mb(bytes) return bytes / 2^20 end

local function run_all()
  local exe = ROOT .. "build/fsdp-lua"
  local n = opts.ranks
  local common = ("--steps %d --warmup %d --timeout %d"):format(opts.steps, opts.warmup, opts.timeout)
  -- env -u: the launcher then splits this machine's cores between the ranks.
  local function ours(ranks, mode)
    return ("env -u OMP_NUM_THREADS %s -n %d spec/bench/bench_dist.lua --mode %s %s"):format(q(exe), ranks, mode, common)
  end
  local runs, order = {}, {
    {"single", ("1 rank"), ours(1, "single")},
    {"ddp", ("%d-rank DDP"):format(n), ours(n, "ddp")},
    {"fsdp", ("%d-rank FSDP"):format(n), ours(n, "fsdp")},
  }
  local failures = {}
  for _, r in ipairs(order) do
    local res, err = run_json(r[2], r[3], "BENCH_DIST")
    runs[r[1]] = res
    if not res then failures[#failures + 1] = err end
  end
  local torch_note
  if opts.torch then
    local py = ROOT .. "spec/reference/.venv/bin/python"
    local f = io.open(py, "r")
    if not f then
      torch_note = "skipped (no spec/reference/.venv; run spec/reference/setup_venv.sh)"
    else
      f:close()
      local cmd = ("env -u OMP_NUM_THREADS %s spec/reference/bench_torch_fsdp.py --world %d --steps %d --warmup %d --timeout %d")
        :format(q(py), n, opts.steps, opts.warmup, opts.timeout)
      local res, err = run_json(("PyTorch FSDP2 %d-rank"):format(n), cmd, nil)
      runs.torch = res
      if not res then failures[#failures + 1] = err; torch_note = "failed (see above)" end
    end
  else
    torch_note = "skipped (--no-torch)"
  end

  for _, e in ipairs(failures) do print("FAILED: " .. e) end

  print(("bench_dist: GPT-2 bench model (10.8M params), global batch %d x seq %d, AdamW + clip; %d timed steps after %d warmup")
    :format(B, T, opts.steps, opts.warmup))
  print(("%-22s %8s %10s %10s %10s %10s %9s %14s %12s  %s"):format("setup", "threads", "tokens/s", "step ms", "comm ms",
    "no-comm ms", "exposed", "exposed/comm", "grad norm", "peak RSS MB per rank"))
  local function row(label, r)
    if not r then print(("%-22s %s"):format(label, "(no result)")); return end
    local rss = {}
    for i, m in ipairs(r.peak_rss_mb_per_rank) do rss[i] = ("%.0f"):format(m) end
    local comm = r.comm_ms and ("%.1f"):format(r.comm_ms) or "-"
    local nocomm = r.nocomm_step_ms and ("%.1f"):format(r.nocomm_step_ms) or "-"
    local exposed = r.exposed_comm_ms and ("%.1f"):format(r.exposed_comm_ms) or "-"
    local ratio = r.exposed_over_comm and ("%.2f"):format(r.exposed_over_comm) or "-"
    local threads = r.threads_per_rank and ("%dx%d"):format(r.world, r.threads_per_rank) or "-"
    local gn = r.grad_norm_ms and ("%.1f (%.2f%%)"):format(r.grad_norm_ms, 100 * r.grad_norm_ms / r.step_ms) or "-"
    print(("%-22s %8s %10.0f %10.1f %10s %10s %9s %14s %12s  %s"):format(label, threads, r.tokens_per_s, r.step_ms, comm,
      nocomm, exposed, ratio, gn, table.concat(rss, " ")))
  end
  row("1 rank", runs.single)
  row(("%d-rank DDP"):format(n), runs.ddp)
  row(("%d-rank FSDP"):format(n), runs.fsdp)
  if runs.torch then
    local t = runs.torch
    row(("PyTorch FSDP2 %d-rank"):format(n), {world = t.world, threads_per_rank = t.threads_per_rank,
      tokens_per_s = t.tokens_per_s, step_ms = t.step_ms, peak_rss_mb_per_rank = t.peak_rss_mb_per_rank})
  else
    print(("%-22s %s"):format(("PyTorch FSDP2 %d-rank"):format(n), torch_note))
  end
  local losses = {}
  for _, k in ipairs {"single", "ddp", "fsdp"} do
    if runs[k] then losses[#losses + 1] = ("%s %.4f"):format(k, runs[k].last_loss_mean) end
  end
  if runs.torch then losses[#losses + 1] = ("torch %.4f"):format(runs.torch.last_loss_mean) end
  if #losses > 0 then print("last-step loss (mean over ranks): " .. table.concat(losses, ", ")) end

  local fs, dd, tt = runs.fsdp, runs.ddp, runs.torch
  if fs and tt then
    local max_rss = math.max(unpack(fs.peak_rss_mb_per_rank))
    print(("ratio     : our %d-rank FSDP tokens/s %.2fx PyTorch FSDP2, peak RSS per rank %.2fx PyTorch FSDP2 (%.0f vs %.0f MB)")
      :format(n, fs.tokens_per_s / tt.tokens_per_s, max_rss / tt.peak_rss_mb, max_rss, tt.peak_rss_mb))
  end
  if fs and dd then
    -- per rank: the largest rank of each (the shards differ by at most a row)
    local function pgo(r)
      local best = 0
      for _, c in ipairs(r.memory_peak_bytes_per_rank) do best = math.max(best, c.param + c.grad + c.optim) end
      return best
    end
    local a, b = pgo(fs), pgo(dd)
    print(("ratio     : FSDP param + grad + optim peak bytes per rank %.1f MB = %.3fx DDP's %.1f MB (target <= 0.55)")
      :format(mb(a), a / b, mb(b)))
  end

  -- Memory by category: peak MB per rank after warmup (each category's own peak; total is the peak of the sum).
  local cols, heads = {}, {}
  for _, k in ipairs {"single", "ddp", "fsdp"} do
    local r = runs[k]
    if r then
      for i, c in ipairs(r.memory_peak_bytes_per_rank) do
        cols[#cols + 1] = c
        heads[#heads + 1] = ("%s r%d"):format(k, i - 1)
      end
    end
  end
  if #cols > 0 then
    print("peak MB by memory category, per rank (fsdp.memory_stats, peaks since warmup):")
    local line = {("%-16s"):format("category")}
    for _, h in ipairs(heads) do line[#line + 1] = ("%10s"):format(h) end
    print(table.concat(line))
    for _, cat in ipairs(CATEGORIES) do
      line = {("%-16s"):format(cat)}
      for _, c in ipairs(cols) do line[#line + 1] = ("%10.1f"):format(mb(c[cat])) end
      print(table.concat(line))
    end
  end
  if #failures > 0 then os.exit(1) end
end

if opts.all then run_all() else run_mode(opts.mode) end
