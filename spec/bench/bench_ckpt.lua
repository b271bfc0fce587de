-- spec/bench/bench_ckpt.lua: the checkpoint part of `make bench`. Measures the throughput (GB/s of checkpoint bytes)
-- of save_pretrained and from_pretrained for a GPT-2 of GPT-2 medium's shapes (n_embd 1024, 24 layers, 16 heads,
-- vocab 50257, n_positions 1024, tied: 354.8M parameters, 1.42 GB in f32) at 1 process and at 2 ranks (FSDP auto
-- plan, from_pretrained(dir, {fsdp_plan = "auto"})), and beside them, in the same run on the same disk:
--   cp           `cp F copy && sync copy` of our model.safetensors (sync FILE fsyncs the copy, as our save fsyncs
--                its files), and `cp F /dev/null` (the same bytes only read)
--   safetensors  Python safetensors save_file (+ os.fsync) / load_file(backend="pread") of a state dict of the
--                same names and shapes (torch tensors): spec/reference/bench_ckpt_torch.py --mode safetensors
--   DCP          torch.distributed.checkpoint save / load at 2 ranks of the same model sharded with FSDP2
--                (fully_shard per block and the root, gloo, CPU): spec/reference/bench_ckpt_torch.py --mode dcp.
--                Its load is timed twice: the resume path (sharded model built again, to_empty, dcp.load), the
--                same work as from_pretrained, and dcp.load alone into the existing model
-- and prints ours / cp, ours / safetensors and ours / DCP, and whether the issue's targets hold: save and load
-- >= 0.9x cp (cp + sync) and >= 2x DCP; then the step-time cost of an async training-checkpoint save (below).
--
-- Page cache: every load reads a file just written, so "warm" loads are page-cache reads, alike for every
-- contender; when /proc/sys/vm/drop_caches is writable (root) the loads are timed again "cold", the page cache
-- dropped (`sync; echo 1 > /proc/sys/vm/drop_caches`) before each one. Saves always end on the disk (every
-- contender fsyncs what it wrote). Each figure is the best of --repeats runs; the spread (min / median / max) is
-- printed. Loads run in the process that saved, after it freed its model.
--
--   build/fsdp-lua spec/bench/bench_ckpt.lua [--params 350M|124M|20M] [--repeats 3] [--ranks 2] [--dir DIR]
--                                            [--timeout S] [--no-cold] [--no-torch]
--
-- The driver (this, without --worker) runs each contender in its own process(es) under a wall-clock limit and
-- writes every checkpoint under DIR/fsdp-bench-ckpt.PID (DIR: --dir, else $TMPDIR, else /tmp), removed at the end,
-- on error too. Our measurements run as
--   build/fsdp-lua [-n 2] spec/bench/bench_ckpt.lua --worker io --ranks N --out DIR ...
--   build/fsdp-lua spec/bench/bench_ckpt.lua --worker async --out DIR
-- which print one line "BENCH_CKPT <json>" per measurement (from rank 0), as the Python script prints one JSON line.
--
-- The async training-checkpoint save (fsdp.checkpoint.save{async = true}): the bench model of bench.lua (GPT-2,
-- vocab 256, n_embd 384, 6 layers, 10.8M parameters; AdamW, batch 4 x 128, 1 process) trains ASYNC_STEPS steps
-- with a save of the model and optimizer after step ASYNC_AT, async (the next steps run while the writer thread
-- writes) and, for comparison, sync; --repeats times each. Printed: the step time with no write in flight, the time
-- the save call blocks (async: it stages every byte into host memory first), the steps the writer overlapped and
-- what they took beyond that step time, the wait() at the end, and their sum, the save's overhead.
local fsdp  = require "fsdp"
local ffi   = require "ffi"
local cjson = require "cjson"

local SIZES = {   -- GPT-2 shapes; vocab 50257 and n_positions 1024 for all (tied head: not written)
  ["350M"] = {n_embd = 1024, n_layer = 24, n_head = 16},   -- GPT-2 medium
  ["124M"] = {n_embd = 768, n_layer = 12, n_head = 12},    -- GPT-2 small
  ["20M"]  = {n_embd = 256, n_layer = 6, n_head = 4},      -- for checking the bench itself
}
local VOCAB, NPOS, SEED = 50257, 1024, 1
local DROP_CACHES = "/proc/sys/vm/drop_caches"

local opts = {params = "350M", repeats = 3, ranks = 2, dir = nil, timeout = 900, cold = true, torch = true,
              worker = nil, out = nil, keep = false}
local ASYNC_STEPS, ASYNC_AT = 10, 3
do
  local usage = "valid: --params 350M|124M|20M, --repeats N, --ranks N, --dir DIR, --timeout S, --no-cold, --no-torch"
  local function int_arg(name, v, min)
    local n = tonumber(v)
    if not n or n ~= math.floor(n) or n < min then
      error(("bench_ckpt: %s needs an integer >= %d, got %s"):format(name, min, tostring(v)), 0)
    end
    return n
  end
  local i = 1
  while arg and arg[i] do
    local a = arg[i]
    if a == "--params" then
      opts.params = arg[i + 1]; i = i + 1
      if not SIZES[opts.params] then
        error(("bench_ckpt: unknown --params %s (valid: 350M, 124M, 20M)"):format(tostring(opts.params)), 0)
      end
    elseif a == "--repeats" then opts.repeats = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--ranks" then opts.ranks = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--timeout" then opts.timeout = int_arg(a, arg[i + 1], 1); i = i + 1
    elseif a == "--dir" then opts.dir = arg[i + 1]; i = i + 1
    elseif a == "--no-cold" then opts.cold = false
    elseif a == "--no-torch" then opts.torch = false
    elseif a == "--worker" then                                 -- internal: one measurement run (see above)
      opts.worker = arg[i + 1]; i = i + 1
      if opts.worker ~= "io" and opts.worker ~= "async" then
        error(("bench_ckpt: unknown --worker %s (valid: io, async)"):format(tostring(opts.worker)), 0)
      end
    elseif a == "--out" then opts.out = arg[i + 1]; i = i + 1   -- internal: the worker's directory
    elseif a == "--keep" then opts.keep = true                  -- internal: leave the last save for the driver
    else error("bench_ckpt: unknown argument " .. a .. " (" .. usage .. ")", 0) end
    i = i + 1
  end
  if opts.worker and not opts.out then error("bench_ckpt: --worker needs --out DIR", 0) end
  if opts.dir == "" then error("bench_ckpt: --dir needs a directory", 0) end
end

local C = fsdp.C
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } fl_bench_ckpt_timespec;
  int clock_gettime(int clk, fl_bench_ckpt_timespec *ts);
]]
local ts = ffi.new("fl_bench_ckpt_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

local function config()
  local s = SIZES[opts.params]
  return fsdp.models.config("gpt2", {vocab_size = VOCAB, n_positions = NPOS, n_embd = s.n_embd, n_layer = s.n_layer,
    n_head = s.n_head})
end

local function peak_rss_mb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmHWM:%s+(%d+)")
    if kb then return tonumber(kb) / 1024 end
  end
  error("bench_ckpt: no VmHWM in /proc/self/status")
end

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

local function remove_tree(path)
  if C.fl_remove_tree(path) < 0 then error("bench_ckpt: " .. require("fsdp.core").last_error(), 0) end
end

-- Whether this process may drop the page cache (root, and /proc/sys writable), without dropping it.
local function can_drop_caches()
  local f = io.open(DROP_CACHES, "w")
  if not f then return false end
  f:close()
  return true
end

-- Writes back dirty pages, then drops the clean page cache (1: page cache only, not dentries and inodes).
local function drop_caches()
  os.execute("sync")
  local f = assert(io.open(DROP_CACHES, "w"))
  f:write("1\n")
  f:close()
end

local function emit(rec)
  io.write("BENCH_CKPT ", cjson.encode(rec), "\n")
  io.flush()
end

-- ---------------------------------------------------------------------------------------------------------------
-- --worker async: the step-time cost of an async training-checkpoint save (1 process, the bench model).
-- ---------------------------------------------------------------------------------------------------------------

local function run_async()
  local ck = require "fsdp.checkpoint"
  local cfg = fsdp.models.config("gpt2", {vocab_size = 256, n_positions = 256, n_embd = 384, n_layer = 6, n_head = 6,
    resid_pdrop = 0, embd_pdrop = 0, attn_pdrop = 0})
  local model = fsdp.models.build(cfg, {seed = SEED})
  local params = model:parameters()
  local opt = fsdp.optim.AdamW(params, {lr = 3e-4, weight_decay = 0.1})
  local B, T = 4, 128   -- short steps, so that the background write spans some of them
  local function train_step(step)
    local ids = fsdp.empty({B, T}, {dtype = "i64"})
    local p = ids:data_ptr("int64_t *")
    local x = step * 7919
    for j = 0, B * T - 1 do x = (x * 1103515245 + 12345) % 2147483648; p[j] = math.floor(x / 65536) % 256 end
    local out = model(ids, {labels = ids})
    out.loss:backward()
    fsdp.clip_grad_norm(params, 1.0)
    opt:step()
    opt:zero_grad()
    out.loss:free(); ids:free()   -- with labels the fused head makes no logits
  end
  for s = 1, 2 do train_step(s) end   -- warmup; AdamW's state exists from here on, so it is saved too

  -- One loop of ASYNC_STEPS steps; mode nil, "async" or "sync": the save after step ASYNC_AT.
  local step_no = 2
  local function loop(mode)
    collectgarbage()
    local steps, save_s, busy = {}, 0, 0
    local dir = ("%s/train-%s"):format(opts.out, mode or "none")
    local t_all = now()
    for s = 1, ASYNC_STEPS do
      local t0 = now()
      step_no = step_no + 1
      train_step(step_no)
      steps[s] = now() - t0
      local st = ck.async_status()
      if st and not st.done then busy = busy + 1 end   -- the writer was still at work when this step ended
      if mode and s == ASYNC_AT then
        local t1 = now()
        ck.save(dir, {model = model, optimizer = opt, step = step_no, async = mode == "async"})
        save_s = now() - t1
      end
    end
    local t2 = now()
    ck.wait()
    local wait_s = now() - t2
    local total = now() - t_all
    local bytes = 0
    if mode then
      for _, name in ipairs(require("fsdp.checkpoint.publish").list(dir, "bench_ckpt")) do
        bytes = bytes + (file_size(dir .. "/" .. name) or 0)
      end
      remove_tree(dir)
    end
    return {steps = steps, save_s = save_s, wait_s = wait_s, total_s = total, busy_steps = busy, bytes = bytes}
  end
  -- Each loop is its own baseline: the median of its steps that ran with no write in flight (the machine drifts
  -- between loops). Overhead = the save call + wait() + what the steps the writer overlapped (and the one in
  -- which it finished) took beyond that median.
  local function median(list)
    local t = {}
    for i, v in ipairs(list) do t[i] = v end
    table.sort(t)
    local n = #t
    return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
  end
  local nparams = 0
  for _, p in ipairs(params) do nparams = nparams + p:numel() end
  for r = 1, opts.repeats do
    for _, mode in ipairs {"async", "sync"} do
      local x = loop(mode)
      local last = mode == "async" and ASYNC_AT + x.busy_steps + 1 or ASYNC_AT
      local quiet, hit = {}, {}
      for i, v in ipairs(x.steps) do
        if i > ASYNC_AT and i <= last then hit[#hit + 1] = v else quiet[#quiet + 1] = v end
      end
      local med = median(quiet)
      local extra = 0
      for _, v in ipairs(hit) do extra = extra + (v - med) end
      emit({contender = "fsdp-lua", op = "train_" .. mode, ["repeat"] = r, params = nparams, steps = ASYNC_STEPS,
            save_after = ASYNC_AT, batch = B, seq = T, threads = fsdp.get_num_threads(), step_s = med,
            save_s = x.save_s, wait_s = x.wait_s, overlapped_steps = #hit, overlapped_extra_s = extra,
            overhead_s = x.save_s + x.wait_s + extra, bytes = x.bytes})
    end
  end
end

-- ---------------------------------------------------------------------------------------------------------------
-- --worker io: our save_pretrained / from_pretrained on --ranks processes (1: a plain model; more: FSDP auto plan).
-- ---------------------------------------------------------------------------------------------------------------

local function run_worker()
  local world = opts.ranks
  local dist
  if world > 1 then
    dist = require "fsdp.dist"
    dist.init{seed = SEED, timeout = opts.timeout}
    if dist.world_size() ~= world then
      error(("bench_ckpt: --ranks %d but the job has %d ranks (use -n %d)"):format(world, dist.world_size(), world), 0)
    end
  end
  local rank = dist and dist.rank() or 0
  local function barrier() if dist then dist.barrier() end end
  local base = {contender = "fsdp-lua", ranks = world}
  local function record(op, cache, r, seconds, bytes)
    if rank ~= 0 then return end
    local rec = {op = op, cache = cache, ["repeat"] = r, seconds = seconds, bytes = bytes}
    for k, v in pairs(base) do rec[k] = v end
    emit(rec)
  end
  local function dir_of(r) return ("%s/ours-n%d-r%d"):format(opts.out, world, r) end

  -- Saves: each into a directory of its own that does not exist yet (removed after, untimed), as cp writes a new
  -- file. The time spans the whole call: config.json, headers, rows, fsync of every file and the directories,
  -- the atomic publish. The model lives only in this function's frame: LuaJIT marks every slot of a live frame,
  -- dead temporaries included, so a model held by the caller would outlive `model = nil` and the loads would
  -- run beside it.
  local function saves()
    local model
    if world > 1 then
      model = fsdp.models.build(config(), {device = "meta", seed = SEED})
      fsdp.apply_plan(model, "auto", {seed = SEED})
    else
      model = fsdp.models.build(config(), {seed = SEED})
    end
    local nparams = 0
    for _, e in ipairs(model:full_parameter_list()) do nparams = nparams + e[2]:numel() end
    base.params = nparams
    local bytes
    for r = 1, opts.repeats do
      local d = dir_of(r)
      barrier()
      local t0 = now()
      fsdp.models.save_pretrained(model, d)
      barrier()
      local dt = now() - t0
      bytes = file_size(d .. "/model.safetensors")
      record("save", "n/a", r, dt, bytes)
      if r < opts.repeats then
        barrier()
        if rank == 0 then remove_tree(d) end
      end
    end
    return bytes
  end
  local bytes = saves()
  -- After two save_pretrained calls a compiled trace holds one of its phase closures as a constant, and through its
  -- upvalues every parameter, until the traces are flushed (checkpoint/hf.lua: clearing `files` and `entries` at
  -- the end of save_pretrained would end that).
  jit.flush()
  collectgarbage(); collectgarbage()

  -- Loads of the last save: config.json, the model built on meta (and the plan applied), every tensor (each
  -- rank's rows) read. Warm: the file was just written, its pages are in the page cache. Each load's model is
  -- freed (its frame gone, collected) before the next.
  local last = dir_of(opts.repeats)
  local fp_opts = world > 1 and {fsdp_plan = "auto"} or nil
  local function load()
    C.fl_st_reset_bytes_read()
    local t0 = now()
    local m = fsdp.models.from_pretrained(last, fp_opts)
    barrier()
    return now() - t0, m ~= nil
  end
  local caches = {"warm"}
  if opts.cold then caches[2] = "cold" end
  for _, cache in ipairs(caches) do
    for r = 1, opts.repeats do
      barrier()
      if cache == "cold" and rank == 0 then drop_caches() end
      barrier()
      record("load", cache, r, (load()), bytes)
      collectgarbage(); collectgarbage()
    end
  end

  -- Peak RSS and the bytes each rank read in its last load (a sharded load reads only its rows).
  local rss, read = {peak_rss_mb()}, {tonumber(C.fl_st_bytes_read())}
  if dist then
    local mine = fsdp.tensor({rss[1], read[1]}, {dtype = "f64"})
    local all = fsdp.zeros({2 * world}, {dtype = "f64"})
    dist.all_gather(all, mine)
    local v = all:totable()
    for i = 0, world - 1 do rss[i + 1], read[i + 1] = v[2 * i + 1], v[2 * i + 2] end
  end
  barrier()
  if rank == 0 then
    if not opts.keep then remove_tree(last) end
    emit({contender = "fsdp-lua", ranks = world, params = base.params, op = "info", bytes = bytes,
          peak_rss_mb_per_rank = rss, bytes_read_per_rank = read})
  end
end

-- ---------------------------------------------------------------------------------------------------------------
-- The driver: one plain process that runs the contenders and prints the summary.
-- ---------------------------------------------------------------------------------------------------------------

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- The repository root (this file is <root>/spec/bench/bench_ckpt.lua); runs start there.
local ROOT = (debug.getinfo(1, "S").source:match("^@(.*)spec/bench/bench_ckpt%.lua$") or "")
if ROOT == "" then ROOT = "./" end

-- Runs cmd from the root under the wall-clock limit; returns the list of JSON records it printed (lines
-- `prefix {...}`, or bare `{...}` lines when prefix is nil), or nil and what went wrong (the end of the output).
local function run_records(label, cmd, prefix)
  local log = os.tmpname()
  -- (LuaJIT's popen close gives no exit status: the shell prints it last)
  local full = ("cd %s && timeout -k 10 %d %s 2>%s; echo \"BENCH_CKPT_RC $?\""):format(q(ROOT), opts.timeout, cmd, q(log))
  io.stderr:write(("bench_ckpt: running %s ...\n"):format(label))
  local t0 = now()
  local h = io.popen(full)
  local out = h:read("*a")
  h:close()
  local code = tonumber(out:match("BENCH_CKPT_RC (%d+)%s*$"))
  local f = io.open(log, "r")
  local err = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(log)
  io.stderr:write(("bench_ckpt: %s took %.0f s\n"):format(label, now() - t0))
  local recs = {}
  for l in out:gmatch("[^\n]+") do
    local js = prefix and l:match("^" .. prefix .. " (%b{})") or (not prefix and l:match("^%b{}$"))
    if js then
      local ok, rec = pcall(cjson.decode, js)
      if ok then recs[#recs + 1] = rec end
    end
  end
  if code ~= 0 or #recs == 0 then
    local status = (code == 124 or code == 137) and ("timed out after " .. opts.timeout .. " s")
                   or ("exit status %s"):format(tostring(code))
    local tail = (out:gsub("BENCH_CKPT_RC %d+%s*$", "") .. err):sub(-2000)
    return nil, ("%s (%s):\n%s"):format(label, status, tail)
  end
  return recs
end

-- Runs a shell command, timed by this process; raises when it fails.
local function timed_sh(cmd)
  local t0 = now()
  local ok = os.execute(cmd)
  local dt = now() - t0
  if ok ~= 0 and ok ~= true then error("bench_ckpt: failed: " .. cmd, 0) end
  return dt
end

-- cp of our 1-process checkpoint file: save = a new copy then `sync` of the copy (coreutils sync FILE fsyncs it;
-- our save fsyncs too); load = `cp F /dev/null`, the same bytes read.
local function run_cp(src, work, cold)
  local bytes = file_size(src)
  local recs = {}
  local function rec(op, cache, r, s)
    recs[#recs + 1] = {contender = "cp", ranks = 1, op = op, cache = cache, ["repeat"] = r, seconds = s, bytes = bytes}
  end
  io.stderr:write("bench_ckpt: running cp ...\n")
  for r = 1, opts.repeats do
    local dst = ("%s/cp-r%d"):format(work, r)
    rec("save", "n/a", r, timed_sh(("cp %s %s && sync %s"):format(q(src), q(dst), q(dst))))
    os.remove(dst)
  end
  for _, cache in ipairs(cold and {"warm", "cold"} or {"warm"}) do
    for r = 1, opts.repeats do
      if cache == "cold" then drop_caches() end
      rec("load", cache, r, timed_sh(("cp %s /dev/null"):format(q(src))))
    end
  end
  return recs
end

-- {op -> {cache -> {seconds...}}} and the bytes, from one contender's records (ops: save, load, and DCP's
-- load_inplace; saves under cache "n/a").
local function collect(recs)
  local out = {bytes = nil, info = nil}
  for _, r in ipairs(recs or {}) do
    if r.op == "info" then out.info = r
    else
      local key = r.op == "save" and "n/a" or r.cache
      out[r.op] = out[r.op] or {}
      out[r.op][key] = out[r.op][key] or {}
      table.insert(out[r.op][key], r.seconds)
      out.bytes = r.bytes
      out.params = out.params or r.params
    end
  end
  return out
end

local function stats(list)
  if not list or #list == 0 then return nil end
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  local n = #s
  local med = n % 2 == 1 and s[(n + 1) / 2] or (s[n / 2] + s[n / 2 + 1]) / 2
  return {min = s[1], med = med, max = s[n], n = n}
end

-- The async-save lines, from the --worker async records (nil: not run, with why).
local function async_lines(recs)
  if not recs then return {"async save: FAILED (see above)"} end
  local by = {train_async = {}, train_sync = {}}
  local any
  for _, r in ipairs(recs) do
    if by[r.op] then table.insert(by[r.op], r); any = r end
  end
  if not any then return {"async save: no result"} end
  local function st(mode, key)
    local list = {}
    for i, r in ipairs(by[mode]) do list[i] = r[key] or 0 end
    return stats(list)
  end
  local function ms(x) return ("%.0f / %.0f / %.0f ms"):format(1e3 * x.min, 1e3 * x.med, 1e3 * x.max) end
  local step = st("train_async", "step_s")   -- each loop's steps with no write in flight
  local out = {
    ("async save: bench model (GPT-2 %.1fM params) + AdamW state, a %.0f MB checkpoint; batch %d x %d, %d steps, the "
     .. "save after step %d; %d runs, min / median / max"):format(any.params / 1e6, any.bytes / 1e6, any.batch, any.seq,
      any.steps, any.save_after, #by.train_async),
    ("  step without a save            : %s"):format(ms(step)),
  }
  for _, mode in ipairs {"async", "sync"} do
    local m = "train_" .. mode
    if #by[m] > 0 then
      local call, over = st(m, "save_s"), st(m, "overhead_s")
      local extra = mode == "async" and (", the writer overlapped %.0f step(s), slowing them by %.0f ms, wait() %.0f ms")
        :format(st(m, "overlapped_steps").med, 1e3 * st(m, "overlapped_extra_s").med, 1e3 * st(m, "wait_s").med) or ""
      out[#out + 1] = ("  %-5s save: the call blocks %s%s; overhead %s (%.2f steps, median)")
        :format(mode, ms(call), extra, ms(over), over.med / step.med)
    end
  end
  return out
end

local function run_driver()
  local parent = opts.dir or os.getenv("TMPDIR") or "/tmp"
  local work = ("%s/fsdp-bench-ckpt.%d"):format(parent:gsub("/+$", ""), require("fsdp.core").pid())
  if C.fl_mkdir_p(work) < 0 then error("bench_ckpt: " .. require("fsdp.core").last_error(), 0) end
  local cold = opts.cold and can_drop_caches()
  local cold_note = not opts.cold and "cold loads skipped (--no-cold)"
                    or not cold and ("cold loads skipped (%s is not writable here)"):format(DROP_CACHES) or nil
  local exe = ROOT .. "build/fsdp-lua"
  local s = SIZES[opts.params]
  local wargs = ("--params %s --repeats %d --timeout %d --out %s%s"):format(opts.params, opts.repeats, opts.timeout,
    q(work), cold and "" or " --no-cold")
  local py = ROOT .. "spec/reference/.venv/bin/python"
  local have_py = opts.torch and io.open(py, "r")
  if have_py then have_py:close(); have_py = true end
  local pyargs = ("--n-embd %d --n-layer %d --n-head %d --vocab %d --n-positions %d --repeats %d --dir %s --timeout %d%s")
    :format(s.n_embd, s.n_layer, s.n_head, VOCAB, NPOS, opts.repeats, q(work), opts.timeout, cold and " --cold" or "")
  local res, failures, async_recs = {}, {}, nil
  local function keep(key, recs, err)
    if recs then res[key] = collect(recs) else failures[#failures + 1] = err end
  end

  local ok, err = pcall(function()
    -- 1 process first, leaving its last checkpoint for cp (same bytes, same disk)
    keep("ours1", run_records("fsdp-lua 1 process",
      ("env -u OMP_NUM_THREADS %s spec/bench/bench_ckpt.lua --worker io --ranks 1 --keep %s"):format(q(exe), wargs), "BENCH_CKPT"))
    local src = ("%s/ours-n1-r%d/model.safetensors"):format(work, opts.repeats)
    if res.ours1 and file_size(src) then
      keep("cp", run_cp(src, work, cold))
      remove_tree(("%s/ours-n1-r%d"):format(work, opts.repeats))
    end
    local n = opts.ranks
    keep("oursN", run_records(("fsdp-lua %d ranks"):format(n),
      ("env -u OMP_NUM_THREADS %s -n %d spec/bench/bench_ckpt.lua --worker io --ranks %d %s"):format(q(exe), n, n, wargs),
      "BENCH_CKPT"))
    if have_py then
      keep("st", run_records("Python safetensors",
        ("env -u OMP_NUM_THREADS %s spec/reference/bench_ckpt_torch.py --mode safetensors %s"):format(q(py), pyargs)))
      keep("dcp", run_records(("torch DCP %d ranks"):format(n),
        ("env -u OMP_NUM_THREADS %s spec/reference/bench_ckpt_torch.py --mode dcp --world %d %s"):format(q(py), n, pyargs)))
    end
    local err
    async_recs, err = run_records("async training-checkpoint save",
      ("env -u OMP_NUM_THREADS %s spec/bench/bench_ckpt.lua --worker async --repeats %d --out %s"):format(q(exe),
        opts.repeats, q(work)), "BENCH_CKPT")
    if not async_recs then failures[#failures + 1] = err end
  end)
  remove_tree(work)
  if not ok then error(err, 0) end

  for _, e in ipairs(failures) do print("FAILED: " .. e) end
  local ref = res.ours1 or res.oursN or {}
  print(("bench_ckpt: GPT-2 n_embd %d, %d layers, %d heads, vocab %d, n_positions %d: %s parameters, f32 checkpoint %.3f GB")
    :format(s.n_embd, s.n_layer, s.n_head, VOCAB, NPOS, ref.params and ("%.1fM"):format(ref.params / 1e6) or "?",
            (ref.bytes or 0) / 1e9))
  print(("disk: %s (every save ends fsynced: ours fsyncs each file and the directories; cp is followed by `sync FILE`; "
    .. "safetensors save_file by os.fsync; DCP fsyncs its files)"):format(parent))
  print(("page cache: warm loads read a file just written (page-cache reads, alike for all); %s")
    :format(cold and "cold loads drop it first (sync; echo 1 > " .. DROP_CACHES .. ")" or cold_note))
  print(("timing: best of %d, spread min / median / max in seconds; GB/s = checkpoint bytes / best time"):format(opts.repeats))

  local rows = {
    {"ours1", "fsdp-lua 1 process"},
    {"oursN", ("fsdp-lua %d ranks (FSDP)"):format(opts.ranks)},
    {"cp", "cp (+ sync) / cp > /dev/null"},
    {"st", "safetensors (Python)"},
    {"dcp", ("torch DCP %d ranks"):format(opts.ranks)},
  }
  local function gbps(r, op, cache)
    local st = r and r[op] and stats(r[op][cache])
    return st and r.bytes / st.min / 1e9, st
  end
  print(("%-30s %-18s %8s %30s"):format("contender", "op", "GB/s", "seconds min / med / max"))
  for _, row in ipairs(rows) do
    local r = res[row[1]]
    if not r then
      print(("%-30s %s"):format(row[2], have_py or (row[1] ~= "st" and row[1] ~= "dcp") and "(no result)"
        or "skipped (no spec/reference/.venv or --no-torch)"))
    else
      for _, oc in ipairs {{"save", "n/a"}, {"load", "warm"}, {"load", "cold"}, {"load_inplace", "warm"},
                           {"load_inplace", "cold"}} do
        local g, st = gbps(r, oc[1], oc[2])
        if g then
          local label = oc[1] == "save" and "save" or (oc[1]:gsub("_", " ") .. " " .. oc[2])
          print(("%-30s %-18s %8.2f %30s"):format(row[2], label, g, ("%.3f / %.3f / %.3f"):format(st.min, st.med, st.max)))
        end
      end
    end
  end
  if res.st and res.st.info and res.st.info.mmap_touch_s then
    print(("  (safetensors load_file's default mmap backend maps the page cache lazily; with every page touched it "
      .. "took %.3f s warm: no copy is made, so it is not the same work and not in the ratios)"):format(res.st.info.mmap_touch_s))
  end
  for _, k in ipairs {"ours1", "oursN", "st", "dcp"} do
    local inf = res[k] and res[k].info
    if inf and inf.peak_rss_mb_per_rank then
      local t = {}
      for i, v in ipairs(inf.peak_rss_mb_per_rank) do t[i] = ("%.0f"):format(v) end
      local extra = ""
      if inf.bytes_read_per_rank and #inf.bytes_read_per_rank > 1 then
        local b = {}
        for i, v in ipairs(inf.bytes_read_per_rank) do b[i] = ("%.3f"):format(v / 1e9) end
        extra = (", GB read per rank in a load %s"):format(table.concat(b, " "))
      end
      print(("peak RSS MB per rank, %s: %s%s"):format(k == "ours1" and "fsdp-lua 1 process" or k == "oursN" and
        "fsdp-lua " .. opts.ranks .. " ranks" or k == "st" and "safetensors" or "DCP", table.concat(t, " "), extra))
    end
  end

  -- Ratios: ours / theirs of GB/s at the best times. The issue's targets: save and load >= 0.9x cp (cp + sync,
  -- the disk's copy rate: one figure for both) and >= 2x DCP. Loads are also set against `cp F /dev/null` (the
  -- same bytes only read), a stricter reference that the targets do not use.
  local function ratio(a, aop, acache, b, bop, bcache, target, what)
    if not have_py and (b == "st" or b == "dcp") then return end   -- skipped, said above
    local ga = gbps(res[a], aop, acache)
    local gb = gbps(res[b], bop, bcache)
    local label = ("%s %s%s"):format(a == "ours1" and "1 process" or opts.ranks .. " ranks", aop,
      aop == "load" and " " .. acache or "")
    if not (ga and gb) then
      print(("ratio     : %-21s / %-26s %s"):format(label, what, "(no result)"))
      return
    end
    local x = ga / gb
    local verdict = target and (x >= target and ("target >= %.1fx met"):format(target)
                                or ("target >= %.1fx NOT met"):format(target)) or ""
    print(("ratio     : %-21s / %-26s %6.2fx  %s"):format(label, what, x, verdict))
  end
  local caches = cold and {"warm", "cold"} or {"warm"}
  for _, a in ipairs {"ours1", "oursN"} do
    ratio(a, "save", "n/a", "cp", "save", "n/a", 0.9, "cp + sync")
    for _, c in ipairs(caches) do ratio(a, "load", c, "cp", "save", "n/a", 0.9, "cp + sync") end
  end
  for _, a in ipairs {"ours1", "oursN"} do
    for _, c in ipairs(caches) do ratio(a, "load", c, "cp", "load", c, nil, ("cp F /dev/null (%s)"):format(c)) end
  end
  ratio("ours1", "save", "n/a", "st", "save", "n/a", nil, "safetensors")
  for _, c in ipairs(caches) do ratio("ours1", "load", c, "st", "load", c, nil, ("safetensors (%s)"):format(c)) end
  ratio("oursN", "save", "n/a", "dcp", "save", "n/a", 2, "DCP")
  for _, c in ipairs(caches) do ratio("oursN", "load", c, "dcp", "load", c, 2, ("DCP resume (%s)"):format(c)) end
  for _, c in ipairs(caches) do
    ratio("oursN", "load", c, "dcp", "load_inplace", c, nil, ("DCP in place (%s)"):format(c))
  end
  for _, l in ipairs(async_lines(async_recs)) do print(l) end
  if #failures > 0 then os.exit(1) end
end

if opts.worker == "io" then run_worker() elseif opts.worker == "async" then run_async() else run_driver() end
