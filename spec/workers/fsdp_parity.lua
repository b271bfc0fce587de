-- spec/workers/fsdp_parity.lua: one rank of the FSDP parity matrix (spec/dist/fsdp_parity_spec.lua), started by
-- `fsdp-lua -n N spec/workers/fsdp_parity.lua OUT_DIR model=... mode=...`. Trains a tiny model with uneven shapes
-- (vocab 97 splits evenly over none of 2, 3, 4 ranks; hidden 40 not over 3) for 6 AdamW steps at lr 1e-2 with clip_grad_norm(1.0), which
-- clips every step, on a fixed global batch of 24 sequences, rank r taking its equal slice; writes
-- OUT_DIR/rank<r>.lua (per-step loss averaged over ranks, grad norm) and, on rank 0, OUT_DIR/weights.safetensors
-- (the final full weights). The spec compares runs.
--
--   model=gpt2|llama|llama_tied, or any registered model_type with _tied / _untied (its tiny config, which already
--         has uneven shapes): mistral_untied, mixtral_tied, ...
--   aux=0   MoE models: output_router_logits off (no load-balancing loss: its per-rank batch statistics make a
--           sharded run differ from one rank holding the whole batch)
--   mode=single   no wrapping (run at 1 rank: the whole batch)
--        ddp      fsdp.ddp
--        auto | declared | manual | function   fsdp.apply_plan with that plan
--        accum    auto, each step as 2 micro-batches, the first with gradient sync off
--        ddp_accum  ddp, the same micro-batches under no_sync
--        ckpt     auto with activation checkpointing of every block
--        fully_shard  fsdp.fully_shard on every block, then on the model, then model:materialize
--        hsdp     auto on a {dp_replicate = 2, dp_shard = world / 2} mesh
--        mp       auto with mixed_precision = {param_dtype = "bf16", reduce_dtype = "f32"}
--        ddp_mp   the same mixed precision by hand around DDP-style averaging: f32 master weights, bf16 copies
--                 in the model, bf16 gradients cast to f32 and all-reduced (average) before clipping and AdamW
--   dropout=P     (default 0) GPT-2: embd_pdrop = resid_pdrop = attn_pdrop = P; Llama: attention_dropout = P. The
--                 model trains in train mode, so the masks (keyed by seed, rank and call) change the losses
local fsdp = require "fsdp"
local dist = require "fsdp.dist"
local F    = require "fsdp.parallel"
local D    = require "dist"

local out_dir = assert(arg[1], "usage: fsdp_parity.lua OUT_DIR model=... mode=...")
local opt = {model = "gpt2", mode = "auto", steps = "6", max_norm = "0.2", dropout = "0", aux = "1"}
for i = 2, #arg do
  local k, v = arg[i]:match("^([%w_]+)=(.*)$")
  assert(k and opt[k] ~= nil, "bad option " .. arg[i])
  opt[k] = v
end

dist.init{seed = 1234}
local rank, world = dist.rank(), dist.world_size()
local B, T, STEPS = 24, 16, tonumber(opt.steps)
assert(B % world == 0, "the global batch must split evenly")

-- The registered models of the matrix: GPT-2 (tied), Llama untied, Llama with tied embeddings, and every other
-- registered model as MODELTYPE_tied / MODELTYPE_untied.
local KINDS = {gpt2 = {"gpt2", true}, llama = {"llama", false}, llama_tied = {"llama", true}}
local kind = KINDS[opt.model]
if not kind then
  local base, tie = opt.model:match("^(.-)_(u?n?tied)$")
  assert(base and fsdp.models.registry[base] and (tie == "tied" or tie == "untied"), "unknown model " .. opt.model)
  kind = {base, tie == "tied"}
end
local mt = kind[1]
local SHAPES = {
  gpt2 = {vocab_size = 97, n_embd = 40, n_head = 4},
  llama = {vocab_size = 97, hidden_size = 40, intermediate_size = 88, num_attention_heads = 4, num_key_value_heads = 2,
           head_dim = 10},
}
local over = {tie_word_embeddings = kind[2]}
for k, v in pairs(SHAPES[mt] or {}) do over[k] = v end
if opt.aux == "0" then over.output_router_logits = false end
local pdrop = assert(tonumber(opt.dropout), "dropout must be a number")
if pdrop > 0 then   -- tiny_config sets every dropout to 0
  if mt == "gpt2" then over.embd_pdrop, over.resid_pdrop, over.attn_pdrop = pdrop, pdrop, pdrop
  else over.attention_dropout = pdrop end
end
local cfg = fsdp.models.tiny_config(mt, over)
local sharded = opt.mode ~= "single" and opt.mode ~= "ddp" and opt.mode ~= "ddp_accum" and opt.mode ~= "ddp_mp"
-- FSDP builds on meta: each rank initialises only its rows, which must equal the full initialisation.
local model = fsdp.models.build(cfg, {device = sharded and "meta" or "cpu", seed = 7})

local block_pattern = mt == "gpt2" and "transformer.h.*" or "model.layers.*"
local ffn = model.model and model.model.layers[1].ffn_name or "mlp"   -- Mixtral's MoE block is block_sparse_moe
local plans = {
  auto = "auto", accum = "auto", ckpt = "auto", hsdp = "auto", mp = "auto", declared = "declared",
  -- nested units: each block's MLP (or MoE block) is a unit of its own inside the block's unit
  manual = {mode = "manual", modules = {[block_pattern] = "free_full_weight", [block_pattern .. "." .. ffn] = "free_full_weight"}},
  ["function"] = {modules = function(name, m) if m.is_block then return {"free_full_weight"} end end},
}

if opt.mode == "ckpt" then
  for _, m in model:named_modules() do if m.is_block then rawset(m, "checkpoint", true) end end
end
if opt.mode == "ddp" or opt.mode == "ddp_accum" then
  require("fsdp.parallel.ddp")(model)
elseif opt.mode == "fully_shard" then
  -- the low-level API, FSDP2 style: each block, then the root; then initialise the meta shards
  for _, m in model:named_modules() do if m.is_block then F.fully_shard(m) end end
  F.fully_shard(model)
  model:materialize{seed = 7}
elseif sharded then
  local mesh
  if opt.mode == "hsdp" then mesh = dist.mesh{{"dp_replicate", 2}, {"dp_shard", math.floor(world / 2)}} end
  local mp = opt.mode == "mp" and {param_dtype = "bf16", reduce_dtype = "f32"} or nil
  F.apply_plan(model, plans[opt.mode], {seed = 7, mesh = mesh, mixed_precision = mp})
end

-- ddp_mp: the module computes with bf16 copies; the optimizer steps the f32 masters.
local masters, lows
if opt.mode == "ddp_mp" then
  masters, lows = {}, {}
  local low_of = {}
  for _, e in ipairs(model:full_parameter_list()) do
    local low = fsdp.no_grad(function() return e[2]:to("bf16") end)
    low.requires_grad = true
    low_of[e[2]] = low
    masters[#masters + 1], lows[#lows + 1] = e[2], low
  end
  for _, m in model:named_modules() do   -- every module holding a master (tied weights: both) gets the copy
    for _, pn in ipairs(m._param_names) do
      local low = low_of[m._params[pn]]
      if low then m:set_parameter(pn, low) end
    end
  end
end

-- AdamW eps 1e-6: with 1e-8 an element whose gradient is ~1e-9 moves by ~lr whatever its sign noise, so
-- f32 rounding differences between code paths would dominate the comparison (see spec/workers/ddp_train.lua).
local params = masters or model:parameters()
local optim = fsdp.optim.AdamW(params, {lr = 1e-2, weight_decay = 0.1, eps = 1e-6})

local function global_batch(step)
  local ids = fsdp.empty({B, T}, {dtype = "i64"})
  local p, x = ids:data_ptr("int64_t *"), 1000 + step
  for j = 0, B * T - 1 do x = (x * 1103515245 + 12345) % 2147483648; p[j] = math.floor(x / 65536) % cfg.vocab_size end
  return ids
end

local function set_sync(on)
  if sharded then F.set_requires_gradient_sync(model, on) else model:set_requires_gradient_sync(on) end
end

local report = {rank = rank, world = world, losses = {}, norms = {}, clipped = 0}
local per = math.floor(B / world)
for step = 1, STEPS do
  local ids = global_batch(step):narrow(1, rank * per + 1, per):contiguous()
  local loss_sum = 0
  if opt.mode == "accum" or opt.mode == "ddp_accum" then
    -- two micro-batches, each loss halved: the summed gradient is the gradient of the slice's mean loss
    local half = math.floor(per / 2)
    for micro = 1, 2 do
      set_sync(micro == 2)
      local mb = ids:narrow(1, (micro - 1) * half + 1, half):contiguous()
      local out = model(mb, {labels = mb})
      local l = out.loss:scale(0.5)
      l:backward()
      loss_sum = loss_sum + l:item()
    end
  else
    local out = model(ids, {labels = ids})
    out.loss:backward()
    loss_sum = out.loss:item()
  end
  if masters then
    for i, low in ipairs(lows) do
      local g = low.grad:to("f32")
      dist.all_reduce(g, {op = "avg"})
      masters[i].grad = g
      low.grad = nil
    end
  end
  local norm = fsdp.clip_grad_norm(params, tonumber(opt.max_norm))
  if norm > tonumber(opt.max_norm) then report.clipped = report.clipped + 1 end
  optim:step()
  optim:zero_grad()
  if masters then
    fsdp.no_grad(function() for i, low in ipairs(lows) do low:copy_(masters[i]) end end)
  end
  local lt = fsdp.tensor({loss_sum}, {dtype = "f64"})
  dist.all_reduce(lt, {op = "avg"})
  report.losses[step] = lt:get(0)
  report.norms[step] = norm
end

local weights
if masters then
  -- the masters under their HF names (the modules now hold the bf16 copies, in the same order)
  weights = {}
  for i, e in ipairs(model:full_parameter_list()) do weights[e[1]] = masters[i] end
else
  weights = F.full_state_dict(model)
end
if rank == 0 then fsdp.safetensors.save(out_dir .. "/weights.safetensors", weights) end
D.write(out_dir, rank, report)
