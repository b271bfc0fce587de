-- examples/custom_plan.lua: an FSDP plan written as a Lua function. It keeps the last two blocks gathered
-- between forward and backward (keep_full_weight), runs the MLPs in bf16 (mixed precision for them only) and
-- frees every other unit's full weight after use (free_full_weight). It prints the plan's fsdp.explain table,
-- trains a few steps on tinyshakespeare with it and prints the losses.
--     build/fsdp-lua -n 2 examples/custom_plan.lua       # any N dividing the global batch of 8; 1 works too
--     build/fsdp-lua -n 2 -i examples/custom_plan.lua    # then the REPL on both ranks: fsdp.shards(model)
-- The global batch is fixed (8 windows a step, 8 / N per rank, the same windows at any N), so the losses are the
-- same at every world size up to the order of the gradient reductions.
local fsdp = require "fsdp"

fsdp.init{seed = 1}
local rank, world = fsdp.rank(), fsdp.world_size()
local GLOBAL_BATCH, SEQ, STEPS = 8, 64, 8
if GLOBAL_BATCH % world ~= 0 then
  error(("custom_plan.lua: %d ranks do not divide the global batch of %d windows; run on 1, 2, 4 or 8")
        :format(world, GLOBAL_BATCH))
end
local function say(...) if rank == 0 then print(...); io.stdout:flush() end end

local cfg = fsdp.models.config("gpt2", {vocab_size = 256, n_positions = SEQ, n_embd = 64, n_layer = 4, n_head = 4,
  resid_pdrop = 0, embd_pdrop = 0, attn_pdrop = 0})
local model = fsdp.models.build(cfg, {seed = 1, device = "meta"})   -- nothing allocated until the plan shards it

-- The plan: called for every module but the root, in pre-order, with its dotted name; an answer makes the
-- module a unit with those options, nil leaves it to the unit of a module around it (finally the root).
--  * The last two blocks keep their full weight after forward: backward starts with them right away, so
--    freeing and gathering them again would cost two all-gathers a step for memory held only briefly (the
--    reason torchtitan keeps the final norm and head gathered).
--  * Each MLP (two thirds of a block's weights and FLOPs) is a unit of its own in bf16: half the bytes to
--    gather and bf16 matmuls. Gradients are reduced in f32 and its output is cast back to f32, so the residual
--    stream and the rest of the block stay f32. An MLP inside a kept block is kept too.
--  * The embeddings free theirs. wte is tied to lm_head, which the root runs at the end: explain lists it
--    under "also used by", and wte's unit is gathered again there. The final norm stays with the root.
local BF16 = {param_dtype = "bf16", reduce_dtype = "f32", output_dtype = "f32"}
local function kept(block) return block >= cfg.n_layer - 2 end
local function plan(name)
  local block = tonumber(name:match("^transformer%.h%.(%d+)$"))
  if block then return kept(block) and "keep_full_weight" or "free_full_weight" end
  local mlp = tonumber(name:match("^transformer%.h%.(%d+)%.mlp$"))
  if mlp then return {kept(mlp) and "keep_full_weight" or "free_full_weight", mixed_precision = BF16} end
  if name == "transformer.wte" or name == "transformer.wpe" then return "free_full_weight" end
  return nil
end
local PLAN = {modules = plan}   -- mode "function", since modules is a function

say(fsdp.explain(model, PLAN, world))   -- the units, their policies and each rank's rows, before sharding
say("")
fsdp.apply_plan(model, PLAN, {seed = 1})   -- each rank initialises only its own rows

local opt = fsdp.optim.AdamW(fsdp.optim.param_groups(model, {weight_decay = 0.1}), {lr = 3e-3, betas = {0.9, 0.95}})
local src = fsdp.data.from_text("examples/data/tinyshakespeare.txt")
local loader = fsdp.data.loader(src, {batch = GLOBAL_BATCH / world, seq = SEQ, seed = 1, rank = rank, world = world})
for step = 1, STEPS do
  local b = loader:next()
  local out = model(b.input_ids, {labels = b.labels})
  local loss = fsdp.tensor({out.loss:item()}, {dtype = "f64"})
  out.loss:backward()
  local norm = fsdp.clip_grad_norm(model:parameters(), 1.0)   -- over every rank's shards
  opt:step(); opt:zero_grad()
  out.loss:free(); b.input_ids:free(); b.labels:free()   -- with labels there are no logits
  fsdp.dist.all_reduce(loss, {op = "avg"})                      -- the mean over the ranks' slices of the batch
  say(("step %d  loss %.6f  grad norm %.4f"):format(step, loss:get(0), norm))
end

-- What this rank holds now: every unit's rows of each parameter (the REPL prints the same table per rank).
local held, units = 0, fsdp.shards(model)
for _, u in ipairs(units) do
  for _, p in ipairs(u.params) do
    local row = 1
    for i = 2, #p.shape do row = row * p.shape[i] end
    held = held + p.rows * row
  end
end
say(("rank 0 holds %d parameter elements in %d units (fsdp.shards(model) lists them)"):format(held, #units))

-- For `fsdp-lua -n N -i examples/custom_plan.lua`: the REPL reads globals, and a script's locals end with it.
rawset(_G, "model", model)
rawset(_G, "plan", PLAN)
rawset(_G, "opt", opt)
rawset(_G, "cfg", cfg)
