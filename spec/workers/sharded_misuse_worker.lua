-- spec/workers/sharded_misuse_worker.lua: what a user may get wrong with a sharded model on real ranks; each case
-- writes what it saw (spec/dist/sharded_misuse_spec.lua compares).
-- Usage: fsdp-lua -n N sharded_misuse_worker.lua DIR CASE
--   save      apply_plan auto, one AdamW step, save_pretrained(DIR/ckpt) (each rank writes its rows); rank 0 also writes the gathered weights
--             to DIR/full.safetensors; every rank then tries safetensors.save of its shards under the full names
--   mismatch  rank 1 resolves another plan than the others: apply_plan must fail on every rank, naming rank 1,
--             and leave the model as it was; then every rank retries with the same plan, and trains a step
local fsdp = require "fsdp"
local D    = require "dist"

local dir, case = arg[1], arg[2]
fsdp.init{seed = 3}
local rank = fsdp.rank()
local report = {rank = rank}
local cfg = fsdp.models.tiny_config("gpt2", {vocab_size = 97, n_embd = 40, n_head = 4})
local ids = fsdp.tensor({{1, 5, 9, 2, 7, 3}}, {dtype = "i64"})

if case == "save" then
  local model = fsdp.models.build(cfg, {device = "meta", seed = 5})
  fsdp.apply_plan(model, "auto", {seed = 5})
  local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2})
  model(ids, {labels = ids}).loss:backward()
  opt:step(); opt:zero_grad()
  fsdp.models.save_pretrained(model, dir .. "/ckpt")
  local full = model:full_state_dict({rank0_only = true})
  if rank == 0 then fsdp.safetensors.save(dir .. "/full.safetensors", full) end
  local shards = {}
  for name, p in model:named_parameters() do shards[name] = p end
  local ok, err = pcall(fsdp.safetensors.save, dir .. "/shards" .. rank .. ".safetensors", shards)
  report.shard_save_ok, report.shard_save_err = ok, tostring(err)
  local f = io.open(dir .. "/shards" .. rank .. ".safetensors", "rb")
  report.shard_file_exists = f ~= nil
  if f then f:close() end
elseif case == "mismatch" then
  local model = fsdp.models.build(cfg, {device = "meta", seed = 5})
  local plan = rank == 1 and {mode = "manual", modules = {["transformer.h.*"] = "free_full_weight",
                                                         ["transformer.h.*.mlp"] = "free_full_weight"}} or "auto"
  local ok, err = pcall(fsdp.apply_plan, model, plan, {seed = 5})
  report.first_ok, report.first_err = ok, tostring(err)
  report.sharded_after_error = require("fsdp.parallel").group(model) ~= nil
  fsdp.apply_plan(model, "auto", {seed = 5})   -- the retry on an untouched model
  local out = model(ids, {labels = ids})
  out.loss:backward()
  report.loss = out.loss:item()
end
D.write(dir, rank, report)
