-- examples/train.lua: trains a small GPT-2 (or Llama) from scratch on tinyshakespeare, byte-level, on the
-- CPU, then samples text from it. `make demo` runs it with a 110 s budget:
--     build/fsdp-lua examples/train.lua --time 110
-- `build/fsdp-lua examples/train.lua --help` lists every option with its default (parsed by lua-argparse).
-- On N ranks (`build/fsdp-lua -n 3 examples/train.lua`) the model is built on meta and sharded with an FSDP
-- plan (--plan auto by default; declared, or ddp for plain data parallelism). The ranks share one shuffled order
-- of windows (fsdp.data's distributed loader): each step takes a global batch of N x --batch windows and rank r
-- its r-th slice, so the data position is a count of global samples. The last --holdout of the windows is never
-- trained on: --eval-every N evaluates the loss there (eval mode, no_grad, every rank its share, averaged).
-- Checkpoints (fsdp.checkpoint): --save-every N --save-dir DIR saves a training checkpoint every N steps and at
-- the end (--save-dir alone: at the end only); --resume DIR continues one, at any world size and plan, exactly
-- where it stopped: weights, optimizer, schedule, random streams and data position come from the checkpoint and
-- --steps says where to stop (keep the global batch: saved with -n 4 --batch 2, resume with -n 2 --batch 4).
-- --export DIR writes the trained model in Hugging Face's layout (save_pretrained).
-- Rank 0 reports: a progress bar redrawn in place when stdout is a terminal, else one line per --log steps;
-- --metrics FILE adds one JSON line per step (examples/plot.lua draws them). A loss or gradient norm that is not
-- finite stops the run (every rank, exit status 1) with the step, the loss and the last good checkpoint.
local fsdp     = require "fsdp"
local optim    = require "fsdp.optim"
local data     = require "fsdp.data"
local ffi      = require "ffi"
-- Debian's lua-argparse (make deps) is /usr/share/lua/5.1/argparse.lua, on LuaJIT's default package.path, which
-- fsdp-lua keeps after its own lua/ (a LUA_PATH without ";;" drops it).
local has_argparse, argparse = pcall(require, "argparse")
if not has_argparse then
  io.stderr:write("train.lua: lua-argparse is missing (make deps installs it: /usr/share/lua/5.1/argparse.lua): ",
                  tostring(argparse), "\n")
  os.exit(1)
end

-- Wall-clock seconds (CLOCK_MONOTONIC): os.clock() counts CPU time of all threads.
ffi.cdef "typedef struct fl_train_timespec { int64_t tv_sec; int64_t tv_nsec; } fl_train_timespec;"
ffi.cdef "typedef struct fl_train_winsize { unsigned short rows, cols, xpixel, ypixel; } fl_train_winsize;"
pcall(ffi.cdef, "int clock_gettime(int clk, fl_train_timespec *ts);")
pcall(ffi.cdef, "int isatty(int fd);")
pcall(ffi.cdef, "int ioctl(int fd, unsigned long request, ...);")
local ts = ffi.new("fl_train_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

local here = (arg and arg[0] or "examples/train.lua"):match("^(.*)/[^/]*$") or "."

-- ---- options ----

local function usage_error(msg)
  io.stderr:write("train.lua: ", msg, " (--help lists the options)\n")
  os.exit(2)
end

-- argparse converters: a value, or nil and the message argparse reports.
local function integer(name, lo)
  return function(s)
    local v = tonumber(s)
    if not v or v ~= math.floor(v) or v < lo then
      return nil, ("--%s expects an integer >= %d, got '%s'"):format(name, lo, s)
    end
    return v
  end
end
local function number(name, lo, strict)   -- strict: lo itself is not allowed
  return function(s)
    local v = tonumber(s)
    if not v or v ~= v or v < lo or (strict and v == lo) or v == math.huge then
      return nil, ("--%s expects a number %s %g, got '%s'"):format(name, strict and ">" or ">=", lo, s)
    end
    return v
  end
end
local function choice(name, list)   -- argparse's own choices check does not name the value it got
  local ok = {}
  for _, v in ipairs(list) do ok[v] = true end
  return function(s)
    if ok[s] then return s end
    return nil, ("--%s must be %s or %s, got '%s'"):format(name, table.concat(list, ", ", 1, #list - 1), list[#list], s)
  end
end
local function text(s) return (s:gsub("\\n", "\n")) end   -- "\n" typed in a shell is a newline

local MFU_HELP = [[
MFU is model FLOPs per token x tokens/s over the peak: (6 N + 6 L C T) FLOPs per token for N parameters, L layers,
C embd and T seq (the forward and backward matmuls plus attention, as spec/bench/bench.lua counts them), against
the sgemm peak measured at startup the bench's way but briefly (the best of a few 1024 x 1024 x 1024 products,
~0.3 s, with the threads each rank trains with, summed over the ranks), or --peak GFLOPS.]]

local EPILOG = [[
Progress (rank 0): with --progress auto, a bar redrawn in place when stdout is a terminal (under -n N: the
launcher's stdout), else a line every --log steps:
  step     8  loss 4.1234  lr 3.00e-03  norm 0.912  51234 tokens/s  MFU  2.71%  mem   12.4 MiB  3.2 s  ETA 0:41
with the mean loss over the steps and ranks since the last line, the gradient norm of the step, tokens/s and MFU
of the training time since the last line (evaluation and saving not counted), the peak tensor memory of rank 0
in those steps (fsdp.memory_stats), the time since the start and the time left.
--metrics FILE (rank 0; appended to on --resume) gets one JSON object per step: step, loss (mean over ranks),
lr, grad_norm, tokens_per_s, mfu, mem_bytes and mem_peak_bytes (rank 0's tensor memory after the step and its
peak during it), step_time and wall_time (seconds), eval_loss on the steps that evaluate.
]] .. MFU_HELP .. [[

A loss or gradient norm that is nan or inf stops every rank before the optimizer step, naming the step, the
loss and the last good checkpoint, with exit status 1.]]

local function build_parser()
  local p = argparse("train.lua",
    "Trains a small GPT-2 or Llama on a text file, byte-level, on one rank or sharded over N "
    .. "(build/fsdp-lua -n N examples/train.lua ...), then samples text from it.")
  p:add_help(false):help_max_width(116):usage_max_width(116):epilog(EPILOG)
  local function opt(name, argname, desc, default, convert)
    local o = p:option(name, desc):argname(argname)
    if default ~= nil then o:default(default) end
    if convert then o:convert(convert) end
    return o
  end
  p:group("Model",
    opt("--model", "NAME", "Architecture, gpt2 or llama.", "gpt2", choice("model", {"gpt2", "llama"})),
    opt("--layers", "L", "Decoder layers.", "4", integer("layers", 1)),
    opt("--embd", "C", "Hidden size.", "128", integer("embd", 1)),
    opt("--heads", "H", "Attention heads.", "4", integer("heads", 1)),
    opt("--seq", "T", "Context length: tokens per window.", "128", integer("seq", 2)))
  p:group("Training",
    opt("--steps", "N", "Steps of the schedule (default: 300 when --time is not given, else none).", nil,
        integer("steps", 1)),
    opt("--time", "SECONDS", "Time budget: stop after it, the cosine decay following the clock (default: none).",
        nil, number("time", 0, true)),
    opt("--stop-at", "N", "Stop after step N as if preempted; the schedule still spans --steps, and with --save-dir "
        .. "the run saves there, to be resumed (default: none).", nil, integer("stop-at", 1)),
    opt("--batch", "B", "Windows per rank per step (the global batch is N ranks x B).", "8", integer("batch", 1)),
    opt("--lr", "LR", "Peak learning rate.", "3e-3", number("lr", 0)),
    opt("--min-lr", "LR", "Learning rate at the end of the cosine decay.", "3e-4", number("min-lr", 0)),
    opt("--warmup", "N", "Steps of linear warmup.", "10", integer("warmup", 0)),
    opt("--wd", "W", "AdamW weight decay (not on biases and norms).", "0.1", number("wd", 0)),
    opt("--clip", "NORM", "Gradient clipping: the largest total norm.", "1.0", number("clip", 0)),
    opt("--seed", "S", "Seed of the weights, the data order and the sampling.", "1234", integer("seed", 0)))
  p:group("Data and evaluation",
    opt("--data", "PATH", "Text file to train on, one token per byte.", here .. "/data/tinyshakespeare.txt"),
    opt("--holdout", "FRACTION", "Share of the windows at the end of the data held out, never trained on.", "0.1",
        number("holdout", 0)),
    opt("--eval-every", "N", "Evaluate the held-out loss every N steps and at the end (default: none, never).", nil,
        integer("eval-every", 1)),
    opt("--eval-batches", "N", "Global batches of held-out windows per evaluation (fewer when the holdout has fewer).",
        "4", integer("eval-batches", 1)))
  p:group("Parallelism",
    opt("--plan", "PLAN", "FSDP plan: auto, declared, ddp or none (default: auto on N > 1 ranks, none on one).", nil,
        choice("plan", {"auto", "declared", "ddp", "none"})),
    opt("--threads", "N", "Compute threads per rank (default: OMP_NUM_THREADS; fsdp-lua -n N sets cores / N).", nil,
        integer("threads", 1)))
  p:group("Checkpoints",
    opt("--save-every", "N", "Save a training checkpoint every N steps and at the end; needs --save-dir "
        .. "(default: none).", nil, integer("save-every", 1)),
    opt("--save-dir", "DIR", "Where checkpoints go; alone, saves at the end only (default: none).", nil),
    opt("--resume", "DIR", "Continue the training checkpoint in DIR, at any world size and plan (default: none).",
        nil),
    opt("--export", "DIR", "Write the trained model in Hugging Face's layout (default: none).", nil))
  p:group("Output",
    opt("--log", "N", "Steps between progress lines when stdout is not a terminal.", "10", integer("log", 1)),
    opt("--progress", "MODE", "auto (a bar on a terminal, else lines), bar or lines.", "auto",
        choice("progress", {"auto", "bar", "lines"})),
    opt("--metrics", "FILE", "One JSON line per step (default: none).", nil),
    opt("--peak", "GFLOPS", "The job's peak for MFU in GFLOP/s, all ranks together (default: measured at startup).",
        nil, number("peak", 0, true)))
  p:group("Sampling",
    opt("--sample", "CHARS", "Bytes to sample after training.", "300", integer("sample", 0)),
    opt("--temperature", "X", "Sampling temperature; 0 samples greedily.", "0.8", number("temperature", 0)),
    opt("--prompt", "TEXT", "Text the sample starts from; \\n is a newline (default: 'ROMEO:\\n').", "ROMEO:\\n", text)
      :show_default(false))
  p:group("Help", p:flag("-h --help", "Print this help and exit."))
  return p
end

local function parse_args(argv)
  local parser = build_parser()
  local ok, o = parser:pparse(argv)
  if not ok then usage_error(o) end
  if o.help then return o, parser end
  if not o.steps and not o.time then o.steps = 300 end
  if o.save_every and not o.save_dir then usage_error("--save-every needs --save-dir DIR") end
  if o.holdout >= 1 then usage_error(("--holdout is the share of the data held out, below 1; got %g"):format(o.holdout)) end
  if o.eval_every and o.holdout == 0 then usage_error("--eval-every needs held-out data (--holdout > 0)") end
  return o, parser
end

-- ---- model ----

local function build_model(o)
  local cfg
  if o.model == "gpt2" then
    cfg = fsdp.models.config("gpt2", {
      vocab_size = data.vocab_size, n_positions = o.seq, n_embd = o.embd, n_layer = o.layers, n_head = o.heads,
      resid_pdrop = 0.0, embd_pdrop = 0.0, attn_pdrop = 0.0,
    })
  else
    cfg = fsdp.models.config("llama", {
      vocab_size = data.vocab_size, max_position_embeddings = o.seq, hidden_size = o.embd,
      intermediate_size = math.floor(o.embd * 8 / 3 / 16 + 0.5) * 16, num_hidden_layers = o.layers,
      num_attention_heads = o.heads, num_key_value_heads = o.heads, tie_word_embeddings = true,
    })
  end
  -- FSDP builds on meta: each rank then initialises only its own rows of every parameter.
  local sharded = o.plan == "auto" or o.plan == "declared"
  local model = fsdp.models.build(cfg, {seed = o.seed, device = sharded and "meta" or "cpu"})
  if sharded then fsdp.apply_plan(model, o.plan, {seed = o.seed})
  elseif o.plan == "ddp" then fsdp.ddp(model) end
  return model
end

-- Samples --sample bytes after --prompt with model:generate (KV cache; temperature 0: greedy). The model sees at
-- most --seq positions, so a long sample is made in windows: each new window starts from the last seq/2 tokens.
local function generate(model, o)
  local ids = data.encode(o.prompt):totable()
  local want, window = #ids + o.sample, 0
  while #ids < want do
    local keep = math.min(#ids, math.max(1, math.floor(o.seq / 2)))
    local ctx = {}
    for i = #ids - keep + 1, #ids do ctx[#ctx + 1] = ids[i] end
    local n = math.min(want - #ids, o.seq - #ctx)
    window = window + 1
    local out = model:generate(fsdp.tensor({ctx}, {dtype = "i64"}), {max_new_tokens = n, eos_token_id = {},
      temperature = o.temperature > 0 and o.temperature or nil, seed = o.seed * 1000 + window})
    local row = out:totable()
    for j = #ctx + 1, #row do ids[#ids + 1] = row[j] end
    out:free()
  end
  return data.decode(ids)
end

-- ---- data: training windows and the held-out tail ----

-- The last floor(windows x holdout) windows of --seq tokens are cut off the end of the data; training sees only
-- the tokens before them (its loader's windows all lie there, whatever their random offset).
local function split_data(src, o, world)
  local T = o.seq
  local held = math.floor(math.floor(src.n / T) * o.holdout)
  if o.holdout > 0 and held == 0 then
    usage_error(("--holdout %g of %d windows of %d tokens holds out none; raise it or give 0")
                :format(o.holdout, math.floor(src.n / T), T))
  end
  if o.eval_every and held < o.batch * world then
    usage_error(("the held-out data has %d windows of %d tokens, fewer than one global batch of %d (%d rank%s x %d); "
                 .. "raise --holdout"):format(held, T, o.batch * world, world, world > 1 and "s" or "", o.batch))
  end
  local cut = src.n - held * T
  local train = held > 0 and data.TokenFile.from_tensor(src:slice(0, cut)) or src
  return train, {first = cut, windows = held}
end

-- evaluate() -> the mean loss over the first min(--eval-batches, all) global batches of held-out windows, in
-- order: window k starts at first + k*T; global batch b's windows are b*G .. b*G + G-1 (G = world x batch) and
-- rank r takes its r-th slice of --batch, as the loader does. Every rank's mean is over as many windows, so
-- the average over the ranks is the mean over all of them, the same at any world size with the same global batch.
local function evaluator(model, src, held, o, rank, world)
  local B, T = o.batch, o.seq
  local G = B * world
  local batches = math.min(o.eval_batches, math.floor(held.windows / G))
  return function()
    local was = model.training
    model:eval()
    local sum = 0
    fsdp.no_grad(function()
      for b = 0, batches - 1 do
        local x = fsdp.empty({B, T}, {dtype = "i64"})
        local px = x:data_ptr("int64_t *")
        for r = 0, B - 1 do
          local start = held.first + (b * G + rank * B + r) * T
          for t = 0, T - 1 do px[r * T + t] = src.ids[start + t] end
        end
        local out = model(x, {labels = x})
        sum = sum + out.loss:item()
        out.loss:free(); x:free()   -- with labels the fused head makes no logits
      end
    end)
    model:train(was)
    local l = fsdp.tensor({sum / batches}, {dtype = "f64"})
    if world > 1 then fsdp.dist.all_reduce(l, {op = "avg"}) end
    return l:get(0), batches * G
  end
end

-- ---- MFU ----

-- This rank's sgemm throughput in GFLOP/s, bench.lua's way (the BLAS the model uses) but briefly: one warm-up
-- product, then rounds of two 1024^3 products until ~0.25 s have passed; the best round counts.
local function sgemm_peak()
  local n = 1024
  local a, b = fsdp.randn({n, n}, {seed = 1}), fsdp.randn({n, n}, {seed = 2})
  fsdp.F.matmul(a, b):free()
  local best, began, rounds = 0, now(), 0
  while rounds < 3 or now() - began < 0.25 do
    local t0 = now()
    for _ = 1, 2 do fsdp.F.matmul(a, b):free() end
    best = math.max(best, 2 * 2 * n ^ 3 / (now() - t0) / 1e9)
    rounds = rounds + 1
  end
  a:free(); b:free()
  return best
end

-- ---- reporting (rank 0) ----

local function stdout_is_terminal()
  -- Under mpirun a rank's stdout is Open MPI's pty whether or not the job's is: the launcher (fsdp-lua -n N)
  -- says which in FSDP_STDOUT_TTY.
  local launcher = os.getenv("FSDP_STDOUT_TTY")
  if launcher and os.getenv("OMPI_COMM_WORLD_SIZE") then return launcher == "1" end
  return ffi.C.isatty(1) == 1
end

local TIOCGWINSZ = 0x5413   -- Linux
local function terminal_width()
  local ws = ffi.new("fl_train_winsize")
  if ffi.C.ioctl(1, TIOCGWINSZ, ws) == 0 and ws.cols > 0 then return ws.cols end
  return tonumber(os.getenv("COLUMNS") or "") or 100
end

local function duration(s)
  s = math.max(0, math.floor(s + 0.5))
  if s >= 3600 then return ("%d:%02d:%02d"):format(math.floor(s / 3600), math.floor(s / 60) % 60, s % 60) end
  return ("%d:%02d"):format(math.floor(s / 60), s % 60)
end

local function mib(bytes) return bytes / 2 ^ 20 end

-- A progress reporter: bar mode redraws one line with \r; lines mode prints a line when step() is told to.
-- print(msg) writes a line of its own either way (the bar is redrawn under it at the next step).
local Progress = {}
Progress.__index = Progress

local function progress(mode, enabled)
  return setmetatable({bar = mode == "bar", on = enabled, shown = false, width = terminal_width()}, Progress)
end

function Progress:print(msg)
  if not self.on then return end
  if self.shown then io.stdout:write("\r\27[K") end
  io.stdout:write(msg, "\n")
  if self.shown then io.stdout:write(self.drawn) end   -- the bar stays below the messages
  io.stdout:flush()
end

local function rate(x) return x >= 1e3 and ("%.1fk"):format(x / 1e3) or ("%.0f"):format(x) end

-- s: {step, last (nil: unknown), frac, loss, eval (the last eval loss or nil), lr, norm, tokens_per_s, mfu, mem, eta}.
-- A line longer than the terminal would wrap, and \r would not reach back to its start: the fields that matter
-- least go first until it fits.
function Progress:draw(s)
  if not self.on then return end
  local cells = 12
  local filled = math.max(0, math.min(cells, math.floor(s.frac * cells + 0.5)))
  local fields = {   -- in display order; {text, priority}: the lowest priorities are dropped first
    {("step %d%s [%s%s] %3d%%"):format(s.step, s.last and ("/" .. s.last) or "", ("#"):rep(filled),
                                       ("."):rep(cells - filled), math.floor(100 * s.frac)), 10},
    {("loss %.4f"):format(s.loss), 9},
    s.eval and {("eval %.4f"):format(s.eval), 5} or nil,
    {("lr %.2e"):format(s.lr), 6},
    {("norm %.3f"):format(s.norm), 3},
    {("%s tok/s"):format(rate(s.tokens_per_s)), 7},
    {("MFU %.1f%%"):format(100 * s.mfu), 4},
    {("mem %.1f MiB"):format(mib(s.mem)), 2},
    {("ETA %s"):format(duration(s.eta)), 8},
  }
  local shown = {}
  for _, f in pairs(fields) do shown[#shown + 1] = f end
  table.sort(shown, function(x, y) return x[2] < y[2] end)
  local keep = {}
  for _, f in ipairs(shown) do keep[f] = true end
  local function render()
    local parts = {}
    for i = 1, 9 do local f = fields[i]; if f and keep[f] then parts[#parts + 1] = f[1] end end
    return table.concat(parts, "  ")
  end
  local line, drop = render(), 1
  while #line > self.width - 1 and drop < #shown do
    keep[shown[drop]] = nil
    drop = drop + 1
    line = render()
  end
  self.drawn = line:sub(1, self.width - 1)
  io.stdout:write("\r", self.drawn, "\27[K")
  io.stdout:flush()
  self.shown = true
end

function Progress:line(s)
  self:print(("step %5d  loss %.4f  lr %.2e  norm %.3f  %7.0f tokens/s  MFU %5.2f%%  mem %6.1f MiB  %.1f s  ETA %s")
    :format(s.step, s.loss, s.lr, s.norm, s.tokens_per_s, 100 * s.mfu, mib(s.mem), s.elapsed, duration(s.eta)))
end

function Progress:finish()
  if self.on and self.shown then io.stdout:write("\n"); io.stdout:flush(); self.shown = false end
end

-- One JSON object per line, numbers to 17 significant digits (they read back as the same doubles); a value
-- that is not finite is written as null, which JSON can hold.
local function json_line(fields)
  local parts = {}
  for _, kv in ipairs(fields) do
    local k, v = kv[1], kv[2]
    if v ~= nil then
      local s
      if v ~= v or v == math.huge or v == -math.huge then s = "null"
      elseif v == math.floor(v) and math.abs(v) < 2 ^ 53 then s = ("%d"):format(v)
      else s = ("%.17g"):format(v) end
      parts[#parts + 1] = ('"%s":%s'):format(k, s)
    end
  end
  return "{" .. table.concat(parts, ",") .. "}\n"
end

local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

-- ---- main ----

local function main(argv)
  local o, parser = parse_args(argv)
  if o.help then
    if fsdp.rank() == 0 then io.stdout:write(parser:get_help(), "\n") end
    return
  end
  if o.threads then fsdp.set_num_threads(o.threads) end
  fsdp.init{seed = o.seed}
  local rank, world = fsdp.rank(), fsdp.world_size()
  o.plan = o.plan or (world > 1 and "auto" or "none")
  if world > 1 and o.plan == "none" then usage_error("--plan none trains on one rank; use auto, declared or ddp") end
  local mode = o.progress == "auto" and (stdout_is_terminal() and "bar" or "lines") or o.progress
  local report = progress(mode, rank == 0)
  local function say(msg) report:print(msg) end

  local metrics
  if rank == 0 and o.metrics then
    local parent = o.metrics:match("^(.*)/[^/]*$")
    if parent and parent ~= "" then os.execute("mkdir -p '" .. parent:gsub("'", "'\\''") .. "'") end
    local err
    metrics, err = io.open(o.metrics, o.resume and "a" or "w")
    if not metrics then usage_error(("--metrics: cannot write '%s': %s"):format(o.metrics, err)) end
  end

  local src = data.from_text(o.data)
  local train_src, held = split_data(src, o, world)
  -- one global order of windows: each step a global batch of world x --batch, this rank's slice of it
  local loader = data.loader(train_src, {batch = o.batch, seq = o.seq, seed = o.seed, rank = rank, world = world})
  local model = build_model(o)
  local params = model:parameters()
  local nparams = 0
  for _, p in ipairs(params) do nparams = nparams + p:numel() end
  local opt = optim.AdamW(optim.param_groups(model, {weight_decay = o.wd}), {lr = o.lr, betas = {0.9, 0.95}})
  local total_params = fsdp.tensor({nparams}, {dtype = "f64"})
  if o.plan == "auto" or o.plan == "declared" then fsdp.dist.all_reduce(total_params) end   -- shards add up
  nparams = total_params:get(0)
  say(("model %s: %d layers, %d embd, %d heads, %.2fM parameters; data %d tokens; batch %d x %d on %d rank%s (plan %s); %d threads")
        :format(o.model, o.layers, o.embd, o.heads, nparams / 1e6, src.n, o.batch, o.seq, world,
                world > 1 and "s" or "", o.plan, fsdp.get_num_threads()))
  say(("held out for evaluation: the last %d windows of %d tokens (%d tokens from token %d); training on %d tokens")
        :format(held.windows, o.seq, src.n - held.first, held.first, train_src.n))
  local evaluate = evaluator(model, src, held, o, rank, world)

  local flops_per_token = 6 * nparams + 6 * o.layers * o.embd * o.seq
  local peak = o.peak
  if peak then
    say(("MFU against --peak %.1f GFLOP/s"):format(peak))
  else
    if world > 1 then fsdp.barrier() end   -- the ranks share the machine's cores: measure them all at once
    local p = fsdp.tensor({sgemm_peak()}, {dtype = "f64"})
    if world > 1 then fsdp.dist.all_reduce(p) end   -- the job's peak: every rank's own, together
    peak = p:get(0)
    say(("MFU against the measured sgemm peak: %.1f GFLOP/s (%d rank%s x %d threads)"):format(peak, world,
          world > 1 and "s" or "", fsdp.get_num_threads()))
  end
  local function mfu(tokens_per_s) return flops_per_token * tokens_per_s / (peak * 1e9) end

  -- Linear warmup over --warmup steps, then a cosine decay to --min-lr over the steps or, with --time, over
  -- the time budget (the machine's speed varies, so progress is elapsed / budget).
  local total = o.steps
  local warmup = total and math.min(o.warmup, total) or o.warmup
  local by_steps = total and optim.cosine_schedule {warmup = warmup, total = total, lr = o.lr, min_lr = o.min_lr}
  local by_time = optim.cosine_schedule {warmup = 0, total = 1e6, lr = o.lr, min_lr = o.min_lr}  -- in ppm of the budget
  local began = now()
  local function time_lr() return by_time(math.max(1, math.floor(1e6 * (now() - began) / o.time))) end
  local step = 0
  local last_ckpt   -- {dir, step}: the checkpoint the run would go back to
  if o.resume then
    -- the model, optimizer, schedule, random streams and data position of the saved run (any world size)
    local res = fsdp.checkpoint.load(o.resume, {model = model, optimizer = opt, loader = loader, schedule = by_steps})
    step = res.step
    last_ckpt = {dir = o.resume, step = step}
    say(("resumed from %s at step %d (saved on %d rank%s, %s)"):format(o.resume, step, res.world_size,
          res.world_size > 1 and "s" or "", res.mode))
  end
  local function save(at)
    fsdp.checkpoint.save(o.save_dir, {model = model, optimizer = opt, step = at, loader = loader,
                                      schedule = by_steps, extra = {args = o}})
    last_ckpt = {dir = o.save_dir, step = at}
    say(("saved step %d to %s"):format(at, o.save_dir))
  end

  -- The loss (mean over the ranks) or the gradient norm (global) of step k is not finite: the weights after
  -- step k-1 gave it, and the optimizer has not stepped. A checkpoint of step s < k-1 is good; one of step k-1
  -- is good only when the loss was finite (the gradient overflowed, not the forward).
  local function stop_nonfinite(k, loss, norm)
    report:finish()
    if metrics then metrics:close() end
    if rank == 0 then
      local where
      if last_ckpt and (last_ckpt.step < k - 1 or (last_ckpt.step == k - 1 and finite(loss))) then
        where = ("last good checkpoint: %s (step %d; --resume %s continues from it)")
                :format(last_ckpt.dir, last_ckpt.step, last_ckpt.dir)
      elseif last_ckpt then
        where = ("no good checkpoint: %s holds step %d, whose weights gave this loss"):format(last_ckpt.dir, last_ckpt.step)
      else
        where = "no checkpoint was saved (--save-every N --save-dir DIR saves them)"
      end
      io.stderr:write(("train.lua: stopped at step %d: loss %s, gradient norm %s (not finite), before the optimizer "
                       .. "step; %s\n"):format(k, ("%.6g"):format(loss), ("%.6g"):format(norm), where))
      io.stderr:flush()
    end
    os.exit(1)
  end

  local first = step + 1
  local last_step = total and math.min(total, o.stop_at or total) or o.stop_at
  local since = {loss = 0, n = 0, tokens = 0, time = 0, mem = 0}   -- for the next progress line
  local loop_began, last_eval = now(), nil
  local function eta(at)
    local left
    if last_step then left = (now() - loop_began) / (at - first + 1) * (last_step - at) end
    if o.time then
      local t = o.time - (now() - began)
      left = left and math.min(left, t) or t
    end
    return left
  end
  local function fraction(at)
    local f = 0
    if last_step then f = at / last_step end
    if o.time then f = math.max(f, (now() - began) / o.time) end
    return math.min(1, f)
  end
  while not (total and step >= total) do
    step = step + 1
    local lr
    if by_steps then lr = by_steps(step)
    else lr = step <= warmup and math.min(time_lr(), o.lr * step / warmup) or time_lr() end
    if by_steps and o.time then lr = math.min(lr, time_lr()) end   -- both given: the further along decays
    opt:set_lr(lr)
    fsdp.reset_peak_memory()
    local t0 = now()
    local batch = loader:next()
    local out = model(batch.input_ids, {labels = batch.labels})
    local loss = out.loss:item()
    out.loss:backward()
    local norm = fsdp.clip_grad_norm(params, o.clip)   -- sums over the shard group under FSDP: the same everywhere
    out.loss:free(); batch.input_ids:free(); batch.labels:free()
    if world > 1 then   -- the mean over the ranks' batches; a nan or inf on any rank reaches every rank
      local l = fsdp.tensor({loss}, {dtype = "f64"})
      fsdp.dist.all_reduce(l, {op = "avg"})
      loss = l:get(0)
    end
    if not (finite(loss) and finite(norm)) then stop_nonfinite(step, loss, norm) end
    opt:step()
    opt:zero_grad()
    local t = now()
    local step_time = t - t0
    local mem = fsdp.memory_stats().total
    local tokens = o.batch * o.seq * world
    since.loss, since.n = since.loss + loss, since.n + 1
    since.tokens, since.time = since.tokens + tokens, since.time + step_time
    since.mem = math.max(since.mem, mem.peak)
    local done = (total and step >= total) or (o.stop_at and step >= o.stop_at) or (o.time and t - began >= o.time)
    if world > 1 then   -- the ranks' clocks differ: stop when any rank's budget is spent, all together
      local flag = fsdp.tensor({done and 1 or 0}, {dtype = "f64"})
      fsdp.dist.all_reduce(flag, {op = "max"})
      done = flag:get(0) > 0
    end
    local eval_loss, eval_windows, eval_time
    if o.eval_every and (step % o.eval_every == 0 or done) then
      local te = now()
      eval_loss, eval_windows = evaluate()
      eval_time, last_eval = now() - te, eval_loss
    end
    if report.bar then
      report:draw {step = step, last = last_step, frac = fraction(step), loss = loss, lr = lr, norm = norm,
                   tokens_per_s = tokens / step_time, mfu = mfu(tokens / step_time), mem = mem.peak, eta = eta(step),
                   eval = last_eval}
    elseif step == first or step % o.log == 0 or done then   -- the loss printed is the mean since the last line
      local tps = since.tokens / since.time
      report:line {step = step, loss = since.loss / since.n, lr = lr, norm = norm, tokens_per_s = tps, mfu = mfu(tps),
                   mem = since.mem, elapsed = now() - began, eta = eta(step)}
      since = {loss = 0, n = 0, tokens = 0, time = 0, mem = 0}
    end
    if eval_loss then
      say(("step %5d  eval loss %.4f  (%d held-out windows, %.1f s)"):format(step, eval_loss, eval_windows, eval_time))
    end
    if metrics then
      metrics:write(json_line {{"step", step}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm},
        {"tokens_per_s", tokens / step_time}, {"mfu", mfu(tokens / step_time)}, {"mem_bytes", mem.current},
        {"mem_peak_bytes", mem.peak}, {"step_time", step_time}, {"wall_time", t - began}, {"eval_loss", eval_loss}})
      metrics:flush()
    end
    if o.save_dir and ((o.save_every and step % o.save_every == 0) or done) then save(step) end
    if done then break end
  end
  report:finish()
  if metrics then metrics:close() end
  if o.export then
    fsdp.checkpoint.save_pretrained(model, o.export)   -- every rank writes its rows; rank 0 the headers
    say(("exported the model to %s (Hugging Face layout)"):format(o.export))
  end
  say(("trained %d steps in %.1f s; sampling %d bytes (temperature %g):"):format(step - first + 1, now() - began,
        o.sample, o.temperature))
  local sample = generate(model, o)   -- every rank runs the sharded forward; rank 0 prints
  say("----")
  say(sample)
  say("----")
end

main({...})
