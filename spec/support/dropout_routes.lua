-- spec/support/dropout_routes.lua: one training run of a small model with dropout on, reached by one of the routes
-- a user takes to "the same run" (spec/dropout_routes_spec.lua in one process, spec/dist/dropout_routes_spec.lua
-- through spec/workers/dropout_routes.lua on real ranks):
--   fsdp    build(cfg, {device = "meta"}) (no seed) + apply_plan(model, "auto", {seed = 3})
--   ddp     build(cfg, {seed = 3}) + fsdp.ddp(model)
--   single  build(cfg, {seed = 3}), one process, no wrapper
-- The masks must come from the run (its seed, the rank, the call), not from the build, so all routes draw the same.
local fsdp = require "fsdp"
local dist = require "fsdp.dist"

local M = {}

-- gpt2: embedding, residual and attention-probability dropout (nn.Dropout, GPT2Attention); llama: the attention
-- dropout of nn.Attention.
local CONFIGS = {
  gpt2 = {vocab_size = 97, n_embd = 32, n_head = 4, embd_pdrop = 0.2, resid_pdrop = 0.2, attn_pdrop = 0.2},
  llama = {vocab_size = 97, hidden_size = 32, intermediate_size = 64, num_attention_heads = 4, num_key_value_heads = 2,
           attention_dropout = 0.2},
}

local B, T = 8, 16

local function global_batch(step, vocab)
  local ids = fsdp.empty({B, T}, {dtype = "i64"})
  local p, x = ids:data_ptr("int64_t *"), 500 + step
  for j = 0, B * T - 1 do x = (x * 1103515245 + 12345) % 2147483648; p[j] = math.floor(x / 65536) % vocab end
  return ids
end

-- train(route, kind, steps) -> {losses = {mean over ranks, per step}, norms = {per step}, weights = {name = full
-- f32 tensor}, counter = dropout calls drawn}; every rank calls it (a sharded model's weights are gathered).
function M.train(route, kind, steps)
  local cfg = fsdp.models.tiny_config(kind, CONFIGS[kind])
  local model
  if route == "fsdp" then
    model = fsdp.models.build(cfg, {device = "meta"})
    fsdp.apply_plan(model, "auto", {seed = 3})
  else
    model = fsdp.models.build(cfg, {seed = 3})
    if route == "ddp" then fsdp.ddp(model) else assert(route == "single", "unknown route " .. route) end
  end
  local keys = require "fsdp.dropout_keys"
  keys.set_counter(0)
  local rank, world = dist.rank(), dist.world_size()
  local per = B / world
  local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2, weight_decay = 0.1, eps = 1e-6})
  local r = {losses = {}, norms = {}, weights = {}}
  for step = 1, steps do
    local ids = global_batch(step, cfg.vocab_size):narrow(1, rank * per + 1, per):contiguous()
    local out = model(ids, {labels = ids})
    out.loss:backward()
    r.norms[step] = fsdp.clip_grad_norm(model:parameters(), 1.0)
    opt:step()
    opt:zero_grad()
    local lt = fsdp.tensor({out.loss:item()}, {dtype = "f64"})
    if world > 1 then dist.all_reduce(lt, {op = "avg"}) end
    r.losses[step] = lt:get(0)
  end
  r.counter = keys.counter()
  if route == "fsdp" then r.weights = model:full_state_dict()
  else for name, p in model:named_parameters() do r.weights[name] = p end end
  return r
end

return M
