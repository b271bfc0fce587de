-- spec/workers/ddp_train.lua: one rank of the DDP specs (spec/dist/ddp_spec.lua), started by
-- `fsdp-lua -n N spec/workers/ddp_train.lua OUT_DIR key=value...` (spec/support/dist.lua's run). Every rank
-- writes OUT_DIR/rank<r>.lua (losses, grad norms, bucket layout, errors) and OUT_DIR/rank<r>.bin (its final
-- weights); the spec compares the files of different runs.
--
-- Options:
--   case=train     3 AdamW steps with clip_grad_norm on a fixed global batch; rank r takes its equal slice
--   case=accum     as train, but each rank's slice runs as 2 micro-batches: the first under no_sync
--   case=unused    a toy module whose parameters are used on some ranks only (hand-computed grads)
--   case=mismatch  rank 1 builds a different model; every rank records the ddp error
--   model=gpt2|llama  wrap=1|0 (0: no ddp, world size 1 only)  cap=<bucket_cap_mb>  batch=<global B>  steps=3
--   variant=shape|count (mismatch)  mesh=none|1d|2d (2d: dp_replicate = 2 x dp_shard = world / 2, flattened by ddp)
local ffi  = require "ffi"
local fsdp = require "fsdp"

local out_dir = assert(arg[1], "usage: ddp_train.lua OUT_DIR key=value...")
local opt = {case = "train", model = "gpt2", wrap = "1", cap = "25", batch = "6", steps = "3", variant = "shape",
             mesh = "none"}
for i = 2, #arg do
  local k, v = arg[i]:match("^(%w+)=(.*)$")
  assert(k and opt[k] ~= nil, "bad option " .. arg[i])
  opt[k] = v
end

-- The modules behind fsdp.init/rank/world_size/mesh and fsdp.ddp, required directly.
local dist = require "fsdp.dist"
local ddp  = require "fsdp.parallel.ddp"
local D    = require "dist"   -- spec/support/dist.lua: result files

dist.init{seed = 1234}
local rank, world = dist.rank(), dist.world_size()
local T, STEPS, LR = 16, tonumber(opt.steps), 1e-3

-- Everything this rank reports (written by D.write at the end).
local report = {rank = rank, world = world}

-- The final weights, f32 bytes in named_parameters order (compared bitwise or within a tolerance).
local function write_weights(model)
  local f = assert(io.open(("%s/rank%d.bin"):format(out_dir, rank), "wb"))
  local names = {}
  for name, p in model:named_parameters() do
    names[#names + 1] = name
    f:write(ffi.string(p:data_ptr(), p:numel() * 4))
  end
  f:close()
  report.params = names
end

-- Mean of a number over the ranks (the spec compares the global loss, not one rank's).
local function all_ranks_mean(x)
  local t = fsdp.tensor({x}, {dtype = "f64"})
  dist.all_reduce(t, {op = "avg"})
  return t:item()
end

-- The fixed global batch [B, T] (an LCG over the vocab, the same on every rank); rows [r0, r0 + n).
local function batch_rows(B, r0, n)
  local ids = fsdp.empty({n, T}, {dtype = "i64"})
  local p = ids:data_ptr("int64_t *")
  local x = 12345
  for j = 0, B * T - 1 do
    x = (x * 1103515245 + 12345) % 2147483648
    local row = math.floor(j / T)
    if row >= r0 and row < r0 + n then p[(row - r0) * T + j % T] = x % 101 end
  end
  return ids
end

local function build(kind, overrides)
  local cfg = fsdp.models.tiny_config(kind, overrides)
  return fsdp.models.build(cfg, {seed = 1234})   -- the same seed everywhere: ddp's broadcast is then a no-op
end

local function grad_sum_squares(model)
  local s = 0
  for _, p in ipairs(model:parameters()) do
    local g = p.grad
    if g then s = s + fsdp.F.sum_squares(g); g:free() end
  end
  return s
end

local function train(accumulate)
  local B = tonumber(opt.batch)
  assert(B % world == 0, "the global batch must split evenly over the ranks")
  local per = B / world
  local model = build(opt.model)
  if opt.wrap == "1" then
    local mesh
    if opt.mesh == "1d" then mesh = dist.mesh{dp_shard = world}
    elseif opt.mesh == "2d" then mesh = dist.mesh{dp_replicate = 2, dp_shard = world / 2} end
    ddp(model, {bucket_cap_mb = tonumber(opt.cap), mesh = mesh})
    report.buckets = model.ddp.buckets()
    report.group_size = model.ddp.group:size()
  else
    assert(world == 1, "wrap=0 runs on one rank")
  end
  -- eps 1e-6, not torch's 1e-8: Adam moves every element by about lr whatever the size of its grad, so an
  -- element whose grad is near 0 (some are ~6e-9 here) turns f32 rounding differences between the runs into
  -- whole-step differences; with eps 1e-6 the step of such an element scales with its grad, and the
  -- comparison measures DDP, not that amplification.
  local opt_ = fsdp.optim.AdamW(model:parameters(), {lr = LR, weight_decay = 0.1, eps = 1e-6})
  report.losses, report.norms, report.local_ss = {}, {}, {}
  for step = 1, STEPS do
    local loss
    if accumulate then
      -- Two equal micro-batches: the mean over the slice is the mean of the two means, so each is scaled by 1/2.
      assert(per % 2 == 0, "accum needs an even per-rank slice")
      local half = per / 2
      local a, b = batch_rows(B, rank * per, half), batch_rows(B, rank * per + half, half)
      local la = model:no_sync(function()
        local out = model(a, {labels = a})
        local l = fsdp.F.scale(out.loss, 0.5)
        l:backward()
        return out.loss:item()
      end)
      report.local_ss[step] = grad_sum_squares(model)   -- differs between ranks: nothing was averaged yet
      local out = model(b, {labels = b})
      fsdp.F.scale(out.loss, 0.5):backward()
      loss = (la + out.loss:item()) / 2
    else
      local ids = batch_rows(B, rank * per, per)
      local out = model(ids, {labels = ids})
      out.loss:backward()
      loss = out.loss:item()
    end
    report.losses[step] = all_ranks_mean(loss)
    report.norms[step] = fsdp.clip_grad_norm(model:parameters(), 1.0)
    opt_:step()
    opt_:zero_grad()
  end
  write_weights(model)
end

-- A module whose parameters are used on some ranks only. Rank 0: loss = sum(a*a) + sum(b); other ranks:
-- loss = sum(a). c is never used. Each rank starts a at rank + 1, so the grads also show the broadcast.
local function unused()
  local Module = fsdp.nn.Module
  local Toy = Module.class("Toy")
  function Toy.new()
    local self = Module.init(setmetatable({}, Toy))
    self:register_parameter("a", fsdp.full({3}, rank + 1))
    self:register_parameter("b", fsdp.full({2, 2}, 5))
    self:register_parameter("c", fsdp.full({4}, 7))
    return self
  end
  function Toy:forward()
    if rank == 0 then return fsdp.F.sum(self.a * self.a) + fsdp.F.sum(self.b) end
    return fsdp.F.sum(self.a)
  end
  local m = ddp(Toy.new(), {bucket_cap_mb = tonumber(opt.cap)})
  report.a_after_wrap = m.a:tolist()
  m():backward()
  report.grads = {}
  for name, p in m:named_parameters() do
    local g = p.grad
    report.grads[name] = g and g:tolist() or "none"
  end
  -- A backward that does not come from the model's forward does not communicate (else ranks would hang
  -- here: only rank 0 runs it).
  if rank == 0 then
    local x = fsdp.full({2}, 3)
    x.requires_grad = true
    fsdp.F.sum(x * x):backward()
    report.other_grad = x.grad:tolist()
  end
  -- no_sync restores the flag even when its function raises.
  local ok, err = pcall(m.no_sync, m, function() error("boom") end)
  report.no_sync_error = (not ok) and tostring(err):match("boom") ~= nil
  report.sync_after = m:requires_gradient_sync()
end

local function mismatch()
  local overrides
  if rank == 1 then
    if opt.variant == "shape" then overrides = {n_embd = 48} else overrides = {n_layer = 3} end
  end
  local model = build("gpt2", overrides)
  local ok, err = pcall(ddp, model)
  report.ok = ok
  report.err = ok and "" or tostring(err)
end

if opt.case == "train" then train(false)
elseif opt.case == "accum" then train(true)
elseif opt.case == "unused" then unused()
elseif opt.case == "mismatch" then mismatch()
else error("unknown case " .. opt.case) end
D.write(out_dir, rank, report)
