-- spec/workers/sharded_load_worker.lua: from_pretrained(CKPT, {fsdp_plan = PLAN}) on N ranks, each rank reading only
-- its rows; writes the gathered weights (DIR/gathered.safetensors, rank 0), each rank's shard sizes and the loss
-- of one fixed batch (spec/dist/sharded_load_spec.lua compares them with the checkpoint and one process).
-- Usage: fsdp-lua -n N sharded_load_worker.lua DIR CKPT PLAN   (PLAN: auto | manual)
local fsdp = require "fsdp"
local D    = require "dist"

local dir, ckpt, which = arg[1], arg[2], arg[3]
fsdp.init{}
local plans = {auto = "auto",
               manual = {mode = "manual", modules = {["transformer.h.*"] = "free_full_weight",
                                                     ["transformer.h.*.mlp"] = "free_full_weight"}}}
local model = fsdp.models.from_pretrained(ckpt, {fsdp_plan = assert(plans[which], "plan")})
local report = {rank = fsdp.rank(), shard_numel = 0, full_numel = 0}
for _, p in ipairs(model:parameters()) do report.shard_numel = report.shard_numel + p:numel() end
for _, e in ipairs(model:full_parameter_list()) do report.full_numel = report.full_numel + e[2]:numel() end
local ids = fsdp.tensor({{3, 1, 4, 1, 5, 9, 2, 6}}, {dtype = "i64"})
report.loss = model(ids, {labels = ids}).loss:item()
local full = model:full_state_dict({rank0_only = true})
if fsdp.rank() == 0 then fsdp.safetensors.save(dir .. "/gathered.safetensors", full) end
D.write(dir, fsdp.rank(), report)
