-- spec/workers/fsdp_memory.lua: one rank of spec/dist/fsdp_memory_spec.lua. Shards a tiny Llama with 4 blocks
-- (auto plan), then reports: the bytes of sharded parameters this rank holds, the share fsdp.explain computes
-- for it (without communicating), how many block units held full weights at once during a forward, and the
-- unsharded-parameter bytes left after backward.
local fsdp = require "fsdp"
local dist = require "fsdp.dist"
local F    = require "fsdp.parallel"
local D    = require "dist"

local out_dir = assert(arg[1])
dist.init{seed = 1}
local rank, world = dist.rank(), dist.world_size()
local cfg = fsdp.models.tiny_config("llama", {num_hidden_layers = 4, tie_word_embeddings = false})
local model = fsdp.models.build(cfg, {device = "meta", seed = 3})
local explained = require("fsdp.parallel").explain(model, "auto", world)
local param_before = tonumber(fsdp.C.fl_mem_current(1))
F.apply_plan(model, "auto", {seed = 3})
local report = {rank = rank, world = world}
report.param_bytes = tonumber(fsdp.C.fl_mem_current(1)) - param_before
report.explained_bytes = 4 * explained.numel_per_rank[rank]
report.unsharded_after_apply = tonumber(fsdp.C.fl_mem_current(2))

local ids = fsdp.tensor({{1, 2, 3, 4, 5, 6}, {7, 8, 9, 10, 11, 12}}, {dtype = "i64"})
for step = 1, 2 do   -- the second step runs with the recorded order, so prefetching is on
  F.peak_unsharded(model, true)
  local out = model(ids, {labels = ids})
  report["peak_blocks_forward_" .. step] = F.peak_unsharded(model, true)
  out.loss:backward()
  report["unsharded_bytes_after_backward_" .. step] = tonumber(fsdp.C.fl_mem_current(2))
  report["units_unsharded_after_backward_" .. step] = F.unsharded_count(model, false)
  model:zero_grad()
end
D.write(out_dir, rank, report)
