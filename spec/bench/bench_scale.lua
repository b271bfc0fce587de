-- spec/bench/bench_scale.lua: `make bench-scale`. Trains real sizes (spec/bench/common.lua's SIZES: GPT-2 124M and
-- 350M at seq 256 and 1024, a Llama-shaped 0.86B at seq 256) a few steps each, ours at 1 process, DDP and FSDP at
-- 2 ranks (bench_dist.lua --mode M --size S --seq T --batch B), beside PyTorch eager (spec/reference/bench_torch.py)
-- and PyTorch FSDP2 (bench_torch_fsdp.py) on the same model, and prints per configuration tokens/s, step time,
-- MFU against this machine's sgemm peak, peak RSS per rank and exposed communication, then a summary of the ratios.
-- It is a driver: each run is its own process under a wall-clock limit; the measuring is bench_dist.lua's.
--
-- Usage: build/fsdp-lua spec/bench/bench_scale.lua [--sizes LIST] [--steps N] [--warmup N] [--ranks N]
--          [--timeout S] [--no-torch] [--list]
--   --sizes  comma-separated configurations (gpt2-256, ...) or sizes (gpt2: both of its seqs); default: all
--            but "bench" (the 10.8M bench model, a quick check of the harness itself)
--   --steps  timed steps, --warmup untimed steps first (default: each configuration's, 1-2 and 2, below)
--   --ranks  of DDP/FSDP/FSDP2 (2)
--   --timeout  the wall-clock limit of every run, in seconds (default: each configuration's own, below)
-- A run that would not fit is not started: params + grads + AdamW states (16 bytes a parameter, f32) times the
-- model copies the run holds (1 process: 1, DDP: one per rank, FSDP: 1 in all, sharded) against MemAvailable just
-- before it; the numbers are printed instead.
local fsdp  = require "fsdp"

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*)spec/bench/bench_scale%.lua$") or "")
if ROOT == "" then ROOT = "./" end
local bench = dofile(ROOT .. "spec/bench/common.lua")
local q = bench.quote

-- The configurations, in the order they run; each whole configuration takes 3-17 minutes on 2 quiet cores, about
-- 40 in all. batch: global, split over the ranks (2 is one sequence a rank). steps, warmup: timed and untimed
-- steps (--steps/--warmup override them); 2 warmup steps: the second step still grows the caching allocator's
-- segments (the first has no prefetch and allocates the optimizer states), the third is the steady state.
-- timeout: each run's limit in seconds, about 3x what its slowest run (PyTorch eager, or DDP/FSDP, which time
-- their loop again without communication) took on a busy machine, scaled up when --steps/--warmup ask for more.
local CONFIGS = {
  {name = "bench", size = "bench", seq = 256, batch = 8, steps = 2, warmup = 2, timeout = 120, quick = true},
  {name = "gpt2-256", size = "gpt2", seq = 256, batch = 4, steps = 2, warmup = 2, timeout = 300},
  {name = "gpt2-1024", size = "gpt2", seq = 1024, batch = 2, steps = 2, warmup = 2, timeout = 450},
  {name = "gpt2-medium-256", size = "gpt2-medium", seq = 256, batch = 2, steps = 2, warmup = 2, timeout = 600},
  {name = "gpt2-medium-1024", size = "gpt2-medium", seq = 1024, batch = 2, steps = 1, warmup = 2, timeout = 900},
  {name = "llama-1b-256", size = "llama-1b", seq = 256, batch = 2, steps = 1, warmup = 2, timeout = 900},
}

local opts = {ranks = 2, torch = true}
do
  local usage = "valid: --sizes LIST, --steps N, --warmup N, --ranks N, --timeout S, --no-torch, --list"
  local function int_arg(name, v, min)
    local n = tonumber(v)
    if not n or n ~= math.floor(n) or n < min then
      error(("bench_scale: %s needs an integer >= %d, got %s"):format(name, min, tostring(v)), 0)
    end
    return n
  end
  local i = 1
  while arg and arg[i] do
    local a = arg[i]
    if a == "--sizes" then
      opts.sizes = arg[i + 1]; i = i + 1
      if opts.sizes == nil then error("bench_scale: --sizes needs a list (see --list)", 0) end
    elseif a == "--steps" then opts.steps = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--warmup" then opts.warmup = int_arg(a, arg[i + 1], 0); i = i + 1
    elseif a == "--ranks" then opts.ranks = int_arg(a, arg[i + 1], 2); i = i + 1
    elseif a == "--timeout" then opts.timeout = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--no-torch" then opts.torch = false
    elseif a == "--list" then opts.list = true
    else error("bench_scale: unknown argument " .. a .. " (" .. usage .. ")", 0) end
    i = i + 1
  end
end

if opts.list then
  for _, c in ipairs(CONFIGS) do
    print(("%-18s %-52s seq %4d, global batch %d, %d+%d steps, limit %d s a run%s"):format(c.name,
      bench.size(c.size).label, c.seq, c.batch, c.warmup, c.steps, c.timeout, c.quick and " (not by default)" or ""))
  end
  os.exit(0)
end

-- --sizes: configuration names, or size names standing for all their configurations.
local chosen = {}
if opts.sizes == nil or opts.sizes == "" then
  for _, c in ipairs(CONFIGS) do if not c.quick then chosen[#chosen + 1] = c end end
else
  local want = {}
  for w in opts.sizes:gmatch("[^,%s]+") do
    local hit = false
    for _, c in ipairs(CONFIGS) do
      if c.name == w or c.size == w then want[c.name], hit = true, true end
    end
    if not hit then
      local names = {}
      for _, c in ipairs(CONFIGS) do names[#names + 1] = c.name end
      error(("bench_scale: unknown size '%s' (valid: %s, or a size: %s)"):format(w, table.concat(names, ", "),
        table.concat(bench.SIZE_NAMES, ", ")), 0)
    end
  end
  for _, c in ipairs(CONFIGS) do if want[c.name] then chosen[#chosen + 1] = c end end
end
for _, c in ipairs(chosen) do
  if c.batch % opts.ranks ~= 0 then
    error(("bench_scale: %s's global batch %d does not split evenly over --ranks %d"):format(c.name, c.batch,
      opts.ranks), 0)
  end
end

local function cores()
  local h = io.popen("nproc")
  local n = tonumber(h:read("*a"))
  h:close()
  return n or fsdp.get_num_threads()
end

local GB = 1e9
local function gb(b) return b / GB end
local function mb(b) return b / 2^20 end

local NCORES = cores()
fsdp.set_num_threads(NCORES)
-- The sgemm peak, as bench.lua measures it: a burst of half a second, which a neighbour's load on a shared
-- machine can halve. It is measured again before each configuration and the best so far is the peak (noise only
-- ever lowers it); each configuration's MFU is against the peak known when it ran.
local PEAK = bench.sgemm_peak()
local function remeasure_peak()
  local p = bench.sgemm_peak()
  if p > PEAK then PEAK = p end
  return p
end
local T_START = bench.now()
local PY = ROOT .. "spec/reference/.venv/bin/python"
local have_torch = false
if opts.torch then
  local f = io.open(PY, "r")
  if f then f:close(); have_torch = true end
end
local torch_note = not opts.torch and "skipped (--no-torch)"
                   or not have_torch and "skipped (no spec/reference/.venv; run spec/reference/setup_venv.sh)" or nil

print(("bench_scale: sgemm peak %.1f GFLOP/s (bench.lua's measure; %d threads, all cores: the ranks share them); "
  .. "MemAvailable %.1f GB; AdamW + clip_grad_norm, f32"):format(PEAK, NCORES, gb(bench.mem_available())))
print("note: our training forward fuses the LM head with the cross-entropy (no [B*T, V] logits); PyTorch's "
  .. "(transformers) computes the logits and their gradient. The comparison is still tokens/s of one optimizer step.")
print("note: MFU = (6 x multiplied params + 6 x layers x width x seq) x tokens/s / sgemm peak; the machine is "
  .. "shared and small: expect 10-30% noise between runs.")
io.stdout:flush()

-- One configuration: its five runs and its table; returns what the summary needs.
local function run_config(c)
  local size = bench.size(c.size)
  local shape = bench.shape(c.size)
  local fpt = bench.flops_per_token(shape, c.seq)
  local state = 16 * shape.n             -- f32 params + grads + AdamW's two moments
  local steps, warmup = opts.steps or c.steps, opts.warmup or c.warmup
  local limit = opts.timeout or math.ceil(c.timeout * math.max(1, (warmup + 2 * steps) / (c.warmup + 2 * c.steps)))
  local now_peak = remeasure_peak()
  local peak = PEAK
  local R = opts.ranks
  local args = ("--size %s --seq %d --batch %d --steps %d --warmup %d"):format(c.size, c.seq, c.batch, steps, warmup)
  local exe = ROOT .. "build/fsdp-lua"
  -- env -u: the launcher splits the cores between the ranks; PyTorch gets the same count per rank.
  local function ours(ranks, mode)
    return ("env -u OMP_NUM_THREADS %s -n %d spec/bench/bench_dist.lua --mode %s %s --timeout %d"):format(q(exe),
      ranks, mode, args, limit)
  end
  local th1 = NCORES
  local runs = {
    {key = "single", label = "ours, 1 process", copies = 1, cmd = ours(1, "single"), prefix = "BENCH_DIST"},
    {key = "eager", label = "PyTorch eager", copies = 1, torch = true, prefix = nil,
     cmd = ("env -u OMP_NUM_THREADS %s spec/reference/bench_torch.py --threads %d %s"):format(q(PY), th1, args)},
    {key = "ddp", label = ("ours, DDP %d ranks"):format(R), copies = R, cmd = ours(R, "ddp"), prefix = "BENCH_DIST"},
    {key = "fsdp", label = ("ours, FSDP %d ranks"):format(R), copies = 1, cmd = ours(R, "fsdp"), prefix = "BENCH_DIST"},
    {key = "fsdp2", label = ("PyTorch FSDP2 %d ranks"):format(R), copies = 1, torch = true, prefix = nil,
     cmd = ("env -u OMP_NUM_THREADS %s spec/reference/bench_torch_fsdp.py --world %d %s --timeout %d"):format(q(PY),
       R, args, limit)},
  }
  print()
  print(("== %s: %s, %.1fM params, seq %d, global batch %d (%d tokens a step), %.2f GFLOP a token; %d timed steps "
    .. "after %d warmup; limit %d s a run"):format(c.name, size.label, shape.n / 1e6, c.seq, c.batch, c.batch * c.seq,
    fpt / 1e9, steps, warmup, limit))
  print(("sgemm peak now %.1f GFLOP/s, best so far %.1f: MFU against %.1f"):format(now_peak, peak, peak))
  io.stdout:flush()
  local res, why = {}, {}
  for _, r in ipairs(runs) do
    local label = c.name .. ": " .. r.label
    if r.torch and torch_note then
      why[r.key] = torch_note
    else
      local need, avail = state * r.copies, bench.mem_available()
      if need > avail then
        why[r.key] = ("does not fit, not run: params + grads + AdamW states %.2f GB x %d = %.2f GB > "
          .. "MemAvailable %.2f GB")
          :format(gb(state), r.copies, gb(need), gb(avail))
        io.stderr:write(("bench_scale: %s: %s\n"):format(label, why[r.key]))
      else
        local out, err, status = bench.run_json(ROOT, label, r.cmd, r.prefix, limit, "bench_scale")
        res[r.key] = out
        if not out then
          why[r.key] = status
          print("FAILED: " .. err)
        end
      end
    end
  end

  -- The table: one row a run; a run without numbers says why.
  local function mfu(r) return 100 * fpt * r.tokens_per_s / (peak * 1e9) end
  print(("%-24s %7s %9s %10s %6s %9s %9s  %s"):format("setup", "threads", "tokens/s", "step ms", "MFU", "comm ms",
    "exposed", "peak RSS MB per rank"))
  for _, r in ipairs(runs) do
    local o = res[r.key]
    if not o then
      print(("%-24s %s"):format(r.label, why[r.key] or "(no result)"))
    else
      local rss = o.peak_rss_mb_per_rank or {o.peak_rss_mb}
      local t = {}
      for i, m in ipairs(rss) do t[i] = ("%.0f"):format(m) end
      local world = o.world or 1
      local threads = o.threads_per_rank or o.threads
      print(("%-24s %7s %9.0f %10.0f %5.1f%% %9s %9s  %s"):format(r.label, ("%dx%d"):format(world, threads),
        o.tokens_per_s, o.step_ms, mfu(o), o.comm_ms and world > 1 and ("%.0f"):format(o.comm_ms) or "-",
        o.exposed_comm_ms and ("%.0f"):format(o.exposed_comm_ms) or "-", table.concat(t, " ")))
    end
  end

  -- Memory: FSDP's param + grad + optim peak bytes per rank (the largest rank) against DDP's, measured, or, when
  -- DDP was not run, its lower bound from the parameter count.
  local function pgo(o)
    local best, tot, rss = 0, 0, 0
    for i, m in ipairs(o.memory_peak_bytes_per_rank) do
      best, tot = math.max(best, m.param + m.grad + m.optim), math.max(tot, m.total)
      rss = math.max(rss, o.peak_rss_mb_per_rank[i])
    end
    return best, tot, rss
  end
  local fs, dd = res.fsdp, res.ddp
  local sum = {config = c, shape = shape, res = res, why = why, mfu = mfu}
  if fs then
    local a, atot, arss = pgo(fs)
    if dd then
      local b, btot, brss = pgo(dd)
      sum.pgo_ratio = a / b
      print(("memory: FSDP param + grad + optim peak %.0f MB per rank = %.3fx DDP's %.0f MB; tensor total %.0f vs "
        .. "%.0f MB; peak RSS %.0f vs %.0f MB"):format(mb(a), a / b, mb(b), mb(atot), mb(btot), arss, brss))
    else
      -- DDP holds the whole state on every rank; its gradient buckets add a copy of the grads on top (not counted)
      local b = state
      sum.pgo_ratio, sum.pgo_ratio_estimated = a / b, true
      print(("memory: FSDP param + grad + optim peak %.2f GB per rank = %.3fx DDP's %.2f GB (DDP not run: its lower "
        .. "bound from the parameter count, 16 B a parameter, f32)"):format(gb(a), a / b, gb(b)))
      print(("memory: peak per rank, FSDP %.2f GB RSS (%.2f GB of tensors) against DDP's >= %.2f GB (%.2f GB on %d "
        .. "ranks) for params + grads + AdamW states alone"):format(arss * 2^20 / GB, gb(atot), gb(b), gb(b * R), R))
    end
  end
  io.stdout:flush()
  return sum
end

local sums = {}
for _, c in ipairs(chosen) do sums[#sums + 1] = run_config(c) end

-- Summary: one line a configuration; a ratio whose runs lack numbers is "-" (the reason is in the tables above).
local function ratio(a, b) return (a and b) and ("%.2fx"):format(a / b) or "-" end
local function tok(r) return r and r.tokens_per_s end
local function rss(r)
  if not r then return nil end
  return r.peak_rss_mb_per_rank and math.max(unpack(r.peak_rss_mb_per_rank)) or r.peak_rss_mb
end
print()
print(("summary, %d ranks: ratios of ours over PyTorch's and between our setups (1p: ours, 1 process)")
  :format(opts.ranks))
print(("%-18s %7s | %-39s | %-39s | %-13s"):format("", "", "tokens/s", "peak RSS per rank (largest rank)",
  "MFU (ours)"))
print(("%-18s %7s | %9s %10s %9s %8s | %9s %10s %9s %8s | %6s %6s"):format("config", "params", "1p/eager", "FSDP/FSDP2",
  "FSDP/1p", "DDP/1p", "1p/eager", "FSDP/FSDP2", "FSDP/1p", "FSDP/DDP", "1p", "FSDP"))
for _, s in ipairs(sums) do
  local r = s.res
  local function pct(r) return r and ("%.1f%%"):format(s.mfu(r)) or "-" end
  print(("%-18s %6.0fM | %9s %10s %9s %8s | %9s %10s %9s %8s | %6s %6s"):format(s.config.name, s.shape.n / 1e6,
    ratio(tok(r.single), tok(r.eager)), ratio(tok(r.fsdp), tok(r.fsdp2)), ratio(tok(r.fsdp), tok(r.single)),
    ratio(tok(r.ddp), tok(r.single)),
    ratio(rss(r.single), rss(r.eager)), ratio(rss(r.fsdp), rss(r.fsdp2)), ratio(rss(r.fsdp), rss(r.single)),
    ratio(rss(r.fsdp), rss(r.ddp)), pct(r.single), pct(r.fsdp)))
end
print("FSDP param + grad + optim peak bytes per rank over DDP's (* DDP not run: over its lower bound from the "
  .. "parameter count):")
for _, s in ipairs(sums) do
  print(("  %-18s %s"):format(s.config.name, s.pgo_ratio and (("%.3fx"):format(s.pgo_ratio)
    .. (s.pgo_ratio_estimated and " *" or "")) or "-"))
end
print(("bench_scale: %.0f s in all"):format(bench.now() - T_START))
