-- examples/train.lua: trains a small GPT-2 (or Llama) from scratch on tinyshakespeare, byte-level, on the
-- CPU, then samples text from it. `make demo` runs it with a 110 s budget:
--     build/fsdp-lua examples/train.lua --time 110
-- On N ranks (`build/fsdp-lua -n 3 examples/train.lua`) the model is built on meta and sharded with an FSDP
-- plan (--plan auto by default; declared, or ddp for plain data parallelism). The ranks share one shuffled order
-- of windows (fsdp.data's distributed loader): each step takes a global batch of N x --batch windows and rank r
-- its r-th slice, so the data position is a count of global samples.
-- Checkpoints (fsdp.checkpoint): --save-every N --save-dir DIR saves a training checkpoint every N steps and at
-- the end (--save-dir alone: at the end only); --resume DIR continues one, at any world size and plan, exactly
-- where it stopped: weights, optimizer, schedule, random streams and data position come from the checkpoint and
-- --steps says where to stop (keep the global batch: saved with -n 4 --batch 2, resume with -n 2 --batch 4).
-- --export DIR writes the trained model in Hugging Face's layout (save_pretrained).
-- Options (all optional): --model gpt2|llama  --steps N  --time SECONDS  --batch B  --seq T  --lr PEAK
--   --min-lr LR  --warmup N  --layers L  --embd C  --heads H  --wd W  --clip NORM  --seed S  --log N
--   --data PATH  --sample CHARS  --temperature X (0 = greedy)  --prompt TEXT  --threads N
--   --plan auto|declared|ddp|none (default: auto on N > 1 ranks, none on one)
--   --save-every N  --save-dir DIR  --resume DIR  --export DIR  --stop-at N (stop after step N, as if preempted:
--   the schedule still spans --steps; with --save-dir the run saves there, to be resumed)
-- A schedule by --time follows the clock, which restarts on --resume; one by --steps resumes exactly.
local fsdp  = require "fsdp"
local optim = require "fsdp.optim"
local data  = require "fsdp.data"

-- Wall-clock seconds (CLOCK_MONOTONIC): os.clock() counts CPU time of all threads.
local ffi = require "ffi"
ffi.cdef "typedef struct fl_train_timespec { int64_t tv_sec; int64_t tv_nsec; } fl_train_timespec;"
pcall(ffi.cdef, "int clock_gettime(int clk, fl_train_timespec *ts);")
local ts = ffi.new("fl_train_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

local here = (arg and arg[0] or "examples/train.lua"):match("^(.*)/[^/]*$") or "."

local DEFAULTS = {
  model = "gpt2", steps = nil, time = nil, batch = 8, seq = 128, lr = 3e-3, ["min-lr"] = 3e-4, warmup = 10,
  layers = 4, embd = 128, heads = 4, wd = 0.1, clip = 1.0, seed = 1234, log = 10,
  data = here .. "/data/tinyshakespeare.txt", sample = 300, temperature = 0.8, prompt = "ROMEO:\n", threads = nil,
  plan = "default",   -- auto on N > 1 ranks, none on one
}
local STRINGS = {model = true, data = true, prompt = true, plan = true, ["save-dir"] = true, resume = true, export = true}
-- Options without a default (absent unless given).
local OPTIONAL = {steps = true, time = true, threads = true, ["save-every"] = true, ["save-dir"] = true, resume = true,
                  export = true, ["stop-at"] = true}
local PLANS = {auto = true, declared = true, ddp = true, none = true, default = true}

local function usage_error(msg)
  io.stderr:write("train.lua: ", msg, "\n")
  os.exit(2)
end

local function parse_args(argv)
  local o = {}
  for k, v in pairs(DEFAULTS) do o[k] = v end
  local i = 1
  while i <= #argv do
    local key = argv[i]:match("^%-%-(.+)$")
    if not key or DEFAULTS[key] == nil and not OPTIONAL[key] then
      local names = {}
      for k in pairs(DEFAULTS) do names[#names + 1] = "--" .. k end
      for k in pairs(OPTIONAL) do names[#names + 1] = "--" .. k end
      table.sort(names)
      usage_error(("unknown argument '%s' (valid: %s)"):format(argv[i], table.concat(names, " ")))
    end
    local v = argv[i + 1]
    if v == nil then usage_error(("--%s needs a value"):format(key)) end
    if STRINGS[key] then o[key] = v:gsub("\\n", "\n")
    else
      o[key] = tonumber(v)
      if o[key] == nil then usage_error(("--%s expects a number, got '%s'"):format(key, v)) end
    end
    i = i + 2
  end
  if not o.steps and not o.time then o.steps = 300 end
  if o.model ~= "gpt2" and o.model ~= "llama" then
    usage_error(("--model must be gpt2 or llama, got '%s'"):format(o.model))
  end
  if not PLANS[o.plan] then usage_error(("--plan must be auto, declared, ddp or none, got '%s'"):format(o.plan)) end
  local every = o["save-every"]
  if every and (every < 1 or every ~= math.floor(every)) then usage_error("--save-every must be an integer >= 1") end
  if every and not o["save-dir"] then usage_error("--save-every needs --save-dir DIR") end
  return o
end

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

local function main(argv)
  local o = parse_args(argv)
  if o.threads then fsdp.set_num_threads(o.threads) end
  fsdp.init{seed = o.seed}
  local rank, world = fsdp.rank(), fsdp.world_size()
  if o.plan == "default" then o.plan = world > 1 and "auto" or "none" end
  if world > 1 and o.plan == "none" then usage_error("--plan none trains on one rank; use auto, declared or ddp") end
  local function say(...) if rank == 0 then print(...); io.stdout:flush() end end
  local src = data.from_text(o.data)
  -- one global order of windows: each step a global batch of world x --batch, this rank's slice of it
  local loader = data.loader(src, {batch = o.batch, seq = o.seq, seed = o.seed, rank = rank, world = world})
  local model = build_model(o)
  local params = model:parameters()
  local nparams = 0
  for _, p in ipairs(params) do nparams = nparams + p:numel() end
  local opt = optim.AdamW(optim.param_groups(model, {weight_decay = o.wd}), {lr = o.lr, betas = {0.9, 0.95}})
  local total_params = fsdp.tensor({nparams}, {dtype = "f64"})
  if o.plan == "auto" or o.plan == "declared" then fsdp.dist.all_reduce(total_params) end   -- shards add up
  say(("model %s: %d layers, %d embd, %d heads, %.2fM parameters; data %d tokens; batch %d x %d on %d rank%s (plan %s); %d threads")
        :format(o.model, o.layers, o.embd, o.heads, total_params:get(0) / 1e6, src.n, o.batch, o.seq, world,
                world > 1 and "s" or "", o.plan, fsdp.get_num_threads()))

  -- Linear warmup over --warmup steps, then a cosine decay to --min-lr over the steps or, with --time, over
  -- the time budget (the machine's speed varies, so progress is elapsed / budget).
  local total = o.steps
  local warmup = total and math.min(o.warmup, total) or o.warmup
  local by_steps = total and optim.cosine_schedule {warmup = warmup, total = total, lr = o.lr, min_lr = o["min-lr"]}
  local by_time = optim.cosine_schedule {warmup = 0, total = 1e6, lr = o.lr, min_lr = o["min-lr"]}  -- in ppm of the budget
  local began, last_log, tokens_since, loss_sum, loss_n = now(), now(), 0, 0, 0
  local function time_lr() return by_time(math.max(1, math.floor(1e6 * (now() - began) / o.time))) end
  local step = 0
  if o.resume then
    -- the model, optimizer, schedule, random streams and data position of the saved run (any world size)
    local res = fsdp.checkpoint.load(o.resume, {model = model, optimizer = opt, loader = loader, schedule = by_steps})
    step = res.step
    say(("resumed from %s at step %d (saved on %d rank%s, %s)"):format(o.resume, step, res.world_size,
          res.world_size > 1 and "s" or "", res.mode))
  end
  local function save(at)
    fsdp.checkpoint.save(o["save-dir"], {model = model, optimizer = opt, step = at, loader = loader,
                                         schedule = by_steps, extra = {args = o}})
    say(("saved step %d to %s"):format(at, o["save-dir"]))
  end
  local first = step + 1
  while not (total and step >= total) do
    step = step + 1
    local lr
    if by_steps then lr = by_steps(step)
    else lr = step <= warmup and math.min(time_lr(), o.lr * step / warmup) or time_lr() end
    if by_steps and o.time then lr = math.min(lr, time_lr()) end   -- both given: the further along decays
    opt:set_lr(lr)
    local batch = loader:next()
    local out = model(batch.input_ids, {labels = batch.labels})
    local loss = out.loss:item()
    out.loss:backward()
    fsdp.clip_grad_norm(params, o.clip)   -- sums over the shard group under FSDP
    opt:step()
    opt:zero_grad()
    out.loss:free(); batch.input_ids:free(); batch.labels:free()
    tokens_since = tokens_since + o.batch * o.seq * world
    loss_sum, loss_n = loss_sum + loss, loss_n + 1
    local t = now()
    local done = (total and step >= total) or (o["stop-at"] and step >= o["stop-at"]) or (o.time and t - began >= o.time)
    if world > 1 then   -- the ranks' clocks differ: stop when any rank's budget is spent, all together
      local flag = fsdp.tensor({done and 1 or 0}, {dtype = "f64"})
      fsdp.dist.all_reduce(flag, {op = "max"})
      done = flag:get(0) > 0
    end
    if step == first or step % o.log == 0 or done then   -- the loss printed is the mean since the last line
      local l = fsdp.tensor({loss_sum / loss_n}, {dtype = "f64"})
      if world > 1 then fsdp.dist.all_reduce(l, {op = "avg"}) end   -- over the ranks' batches
      say(("step %5d  loss %.4f  lr %.2e  %7.0f tokens/s  %6.1f s")
            :format(step, l:get(0), lr, tokens_since / (t - last_log), t - began))
      last_log, tokens_since, loss_sum, loss_n = t, 0, 0, 0
    end
    local every = o["save-every"]
    if o["save-dir"] and ((every and step % every == 0) or done) then save(step) end
    if done then break end
  end
  if o.export then
    fsdp.checkpoint.save_pretrained(model, o.export)   -- every rank writes its rows; rank 0 the headers
    say(("exported the model to %s (Hugging Face layout)"):format(o.export))
  end
  say(("trained %d steps in %.1f s; sampling %d bytes (temperature %g):"):format(step - first + 1, now() - began,
        o.sample, o.temperature))
  local text = generate(model, o)   -- every rank runs the sharded forward; rank 0 prints
  say("----")
  say(text)
  say("----")
end

main({...})
