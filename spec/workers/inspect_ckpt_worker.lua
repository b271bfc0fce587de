-- spec/workers/inspect_ckpt_worker.lua: one rank of spec/dist/inspect_spec.lua. Shards a tiny Llama (auto plan) over
-- the ranks, takes one AdamW step, saves a training checkpoint (DIR/ckpt, fsdp.checkpoint.save) and writes what the
-- engine holds, for the spec to compare with `fsdp-lua inspect`: rank 0 the gathered weights (DIR/full.safetensors),
-- every rank the first row, rows and exp_avg values of its shard of model.embed_tokens.weight.
-- Usage: fsdp-lua -n N inspect_ckpt_worker.lua DIR
local fsdp = require "fsdp"
local D    = require "dist"

local dir = assert(arg[1])
fsdp.init{seed = 5}
local cfg = fsdp.models.tiny_config("llama", {tie_word_embeddings = false})
local model = fsdp.models.build(cfg, {device = "meta"})
fsdp.apply_plan(model, "auto", {seed = 5})
local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2})
local ids = fsdp.tensor({{1, 2, 3, 4, 5, 6}}, {dtype = "i64"})
model(ids, {labels = ids}).loss:backward()
opt:step()
opt:zero_grad()
fsdp.checkpoint.save(dir .. "/ckpt", {model = model, optimizer = opt, step = 1})
local full = model:full_state_dict({rank0_only = true})
if fsdp.rank() == 0 then fsdp.safetensors.save(dir .. "/full.safetensors", full) end
local emb = model.model.embed_tokens.weight
local shard = fsdp.Tensor.local_of(emb)
local info = fsdp.Tensor.shard_info(shard)
local exp_avg
opt:each_param(function(id, p) if p == shard then exp_avg = opt.state[id].exp_avg:totable() end end)
D.write(dir, fsdp.rank(), {rank = fsdp.rank(), row0 = info.row0, rows = shard:size(1), exp_avg = exp_avg})
