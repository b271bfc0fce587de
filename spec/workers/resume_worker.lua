-- spec/workers/resume_worker.lua: one run of spec/dist/resume_spec.lua — trains tiny models (AdamW, cosine schedule,
-- grad clipping, dropout) on the distributed loader, saving or resuming training checkpoints, and dumps what it
-- holds so that the spec can compare runs bit for bit.
-- Usage: fsdp-lua -n N resume_worker.lua DIR key=value...
--   phase=first    trains steps 1..steps, saving after step save_at to CKPT/<model> (and async to CKPT/<model>-async
--                  when async=1, left to the end of the script to publish); dumps the state at the save ("saved") and
--                  at the end ("final")
--   phase=resume   builds the model with another seed, loads CKPT/<model><suffix>, dumps it ("loaded"), trains
--                  the remaining steps, dumps "final"
--   phase=kill     steps 1-2, save (dump "saved"), step 3, then a second save that is killed: kill=sync (the test hook
--                  FSDP_CHECKPOINT_TEST_KILL kills rank 1 after it wrote its file) or kill=async (rank 1 kills itself
--                  while the background write is held back by FSDP_CHECKPOINT_TEST_WRITE_DELAY)
--   phase=badload  loads CKPT/<model> and reports the error every rank raised
--   mode=plain|ddp|fsdp  plan=auto|declared|manual  mesh=none|hsdp (dp_replicate 2 x dp_shard world/2)
--   models=gpt2,llama (or any registered model_type: its tiny config)  steps=6  save_at=3  batch=<per rank>  dropout=1|0  suffix=  async=0|1
-- A dump is DIR/<model>-<tag>-rank<R>.bin, the raw bytes of this rank's local tensors (parameters and optimizer
-- state), with an index in the rank's result: {key = "model.<name>" | "<state>.<name>", start, count, at}.
local ffi  = require "ffi"
local fsdp = require "fsdp"
local data = require "fsdp.data"
local ck   = require "fsdp.checkpoint"
local D    = require "dist"

local dir = assert(arg[1], "usage: resume_worker.lua DIR key=value...")
local o = {phase = "first", mode = "fsdp", models = "gpt2", steps = "6", save_at = "3", batch = "2", dropout = "1",
           suffix = "", async = "0", kill = "sync", ckpt = dir .. "/ckpt", plan = "auto", mesh = "none"}
for i = 2, #arg do
  local k, v = arg[i]:match("^([%w_]+)=(.*)$")
  assert(k and o[k] ~= nil, "bad option " .. arg[i])
  o[k] = v
end
local STEPS, SAVE_AT, B, T = tonumber(o.steps), tonumber(o.save_at), tonumber(o.batch), 16

fsdp.init{}
local rank, world = fsdp.rank(), fsdp.world_size()
local report = {rank = rank, world = world}
local mesh = o.mesh == "hsdp" and fsdp.mesh{dp_replicate = 2, dp_shard = world / 2} or nil
-- under HSDP the replicas hold the same shards: the first replica's ranks dump them
local dumps = mesh == nil or mesh:coordinate("dp_replicate") == 0

-- A token stream the loader cuts into windows: an LCG over the smallest tiny vocabulary (97).
local function source()
  local n = 6000
  local ids = fsdp.empty({n}, {dtype = "i64"})
  local p, x = ids:data_ptr("int64_t *"), 7
  for i = 0, n - 1 do x = (x * 1103515245 + 12345) % 2147483648; p[i] = x % 97 end
  return data.TokenFile.from_tensor(ids)
end
local src = source()

local function build(kind, seed)
  local drop = o.dropout == "1" and 0.1 or 0.0
  local cfg = kind == "gpt2"
    and fsdp.models.tiny_config("gpt2", {resid_pdrop = drop, embd_pdrop = drop, attn_pdrop = drop})
    or fsdp.models.tiny_config(kind, {attention_dropout = drop})
  local model
  if o.mode == "fsdp" then
    model = fsdp.models.build(cfg, {seed = seed, device = "meta"})
    local plan = o.plan
    if plan == "manual" then
      plan = {mode = "manual", modules = {[kind == "gpt2" and "transformer.h.*" or "model.layers.*"] = "free_full_weight"}}
    end
    fsdp.apply_plan(model, plan, {seed = seed, mesh = mesh})
  else
    model = fsdp.models.build(cfg, {seed = seed})
    if o.mode == "ddp" then fsdp.ddp(model) end
  end
  local opt = fsdp.optim.AdamW(fsdp.optim.param_groups(model, {weight_decay = 0.1}), {lr = 1e-3, betas = {0.9, 0.95}})
  local sched = fsdp.optim.cosine_schedule{warmup = 2, total = STEPS, lr = 1e-2, min_lr = 1e-3}
  local loader = data.loader(src, {batch = B, seq = T, seed = 5, rank = rank, world = world})
  return {kind = kind, model = model, opt = opt, sched = sched, loader = loader, losses = {}}
end

local function mean_over_ranks(x)
  if world == 1 then return x end
  local t = fsdp.tensor({x}, {dtype = "f64"})
  fsdp.dist.all_reduce(t, {op = "avg"})
  return t:item()
end

local function train_step(r, step)
  r.opt:set_lr(r.sched(step))
  local b = r.loader:next()
  local out = r.model(b.input_ids, {labels = b.labels})
  local loss = out.loss:item()
  out.loss:backward()
  fsdp.clip_grad_norm(r.model:parameters(), 0.5)
  r.opt:step()
  r.opt:zero_grad()
  out.loss:free(); b.input_ids:free(); b.labels:free()
  r.losses[step] = mean_over_ranks(loss)
end

-- This rank's local tensors: plain and DDP models hold every tensor whole (rank 0 dumps them), FSDP its shards.
local function dump(r, tag)
  local index, steps, at = {}, {}, 0
  local path = ("%s/%s-%s-rank%d.bin"):format(dir, r.kind, tag, rank)
  local f = assert(io.open(path, "wb"))
  local function put(key, t, start)
    local n = t:numel()
    f:write(ffi.string(t:data_ptr(), n * 4))
    index[#index + 1] = {key = key, start = start, count = n, at = at}
    at = at + n * 4
  end
  if (o.mode == "fsdp" and dumps) or rank == 0 then
    local id_of = {}
    r.opt:each_param(function(id, p) id_of[p] = id end)
    for _, e in ipairs(r.model:full_parameter_list()) do
      local name, full = e[1], e[2]
      local loc = fsdp.Tensor.local_of(full)
      local info = fsdp.Tensor.shard_info(loc)
      local start = info and info.offset or 0
      put("model." .. name, loc, start)
      local st = r.opt.state[id_of[loc]]
      if st then
        steps[name] = st.step
        for _, sn in ipairs {"exp_avg", "exp_avg_sq"} do put(sn .. "." .. name, st[sn], start) end
      end
    end
  end
  f:close()
  report[r.kind .. "-" .. tag] = {index = index, steps = steps, lr = r.opt:get_lr(), groups = #r.opt.param_groups}
end

local runs = {}
for kind in o.models:gmatch("[^,]+") do runs[#runs + 1] = kind end

if o.phase == "first" then
  for _, kind in ipairs(runs) do
    local r = build(kind, 11)
    for step = 1, STEPS do
      train_step(r, step)
      if step == SAVE_AT then
        dump(r, "saved")
        local opts = {model = r.model, optimizer = r.opt, step = step, loader = r.loader, schedule = r.sched,
                      extra = {model = kind, note = "first run", list = {1, 2.5}}}
        ck.save(o.ckpt .. "/" .. kind, opts)
        if o.async == "1" then
          opts.async = true
          ck.save(o.ckpt .. "/" .. kind .. "-async", opts)
          local s = ck.async_status()
          report[kind .. "-async"] = {in_flight_at_return = not s.done, bytes = s.bytes}
        end
      elseif o.async == "1" and step == SAVE_AT + 1 then
        -- a training step ran while the writer was (held back, still) writing
        local s = ck.async_status()
        report[kind .. "-async"].in_flight_after_step = s ~= nil and not s.done
      end
    end
    dump(r, "final")
    report[kind .. "-losses"] = r.losses
  end
  -- the async save of the last model is left in flight: the end of the script publishes it
  report.pending_at_end = ck.async_status() ~= nil
elseif o.phase == "resume" then
  for _, kind in ipairs(runs) do
    local r = build(kind, 99)   -- another init and other dropout seeds: the checkpoint must restore them all
    local res = ck.load(o.ckpt .. "/" .. kind .. o.suffix, {model = r.model, optimizer = r.opt, loader = r.loader,
                                                              schedule = r.sched})
    report[kind .. "-loaded-meta"] = {step = res.step, extra = res.extra, world_size = res.world_size, mode = res.mode}
    dump(r, "loaded")
    for step = res.step + 1, STEPS do train_step(r, step) end
    dump(r, "final")
    report[kind .. "-losses"] = r.losses
  end
elseif o.phase == "kill" then
  local r = build(runs[1], 11)
  for step = 1, 2 do train_step(r, step) end
  dump(r, "saved")
  ck.save(o.ckpt .. "/" .. r.kind, {model = r.model, optimizer = r.opt, step = 2, loader = r.loader, schedule = r.sched})
  D.write(dir, rank, report)   -- before the run dies
  train_step(r, 3)
  local async = o.kill == "async"
  ck.save(o.ckpt .. "/" .. r.kind, {model = r.model, optimizer = r.opt, step = 3, loader = r.loader, async = async})
  if async and rank == 1 then
    pcall(ffi.cdef, "int kill(int pid, int sig);")
    ffi.C.kill(require("fsdp.core").pid(), 9)   -- killed while the background write is in flight
  end
  ck.wait()
  report.survived = true   -- must not be reached
elseif o.phase == "badload" then
  local r = build(runs[1], 99)
  local ok, err = pcall(ck.load, o.ckpt .. "/" .. r.kind, {model = r.model, optimizer = r.opt})
  report.ok, report.err = ok, tostring(err)
end

D.write(dir, rank, report)
