-- spec/workers/explain_memory_worker.lua: one rank of spec/dist/explain_memory_spec.lua. For each case (a model, a
-- plan, options) it writes what fsdp.explain predicted for this world size (the shard table and the per-rank
-- memory), what fsdp.shards shows after really sharding, what the engine itself holds on this rank (each shard's
-- first row, rows and bytes, read from the shard tensors) and what the engine's memory counters measured over two
-- AdamW training steps (param, grad and optim bytes after each step; the peak of gathered weights during it).
-- Usage: fsdp-lua -n N explain_memory_worker.lua DIR
local fsdp = require "fsdp"
local D    = require "dist"

local dir = assert(arg[1])
fsdp.init{seed = 1}
local rank, world = fsdp.rank(), fsdp.world_size()
local C = fsdp.C
local cat = require("fsdp.core").mem_categories

local CASES = {
  {name = "llama untied, auto", model = "llama", cfg = {num_hidden_layers = 3, tie_word_embeddings = false},
   plan = "auto"},
  {name = "gpt2 tied, auto", model = "gpt2", cfg = {vocab_size = 97}, plan = "auto"},
  {name = "llama tied, nested manual plan, bf16 mixed precision", model = "llama",
   cfg = {num_hidden_layers = 2, tie_word_embeddings = true},
   plan = {mode = "manual", modules = {["model.layers.*"] = "free_full_weight",
                                       ["model.layers.*.mlp"] = "keep_full_weight"}},
   opts = {mixed_precision = {param_dtype = "bf16", reduce_dtype = "f32"}}},
  {name = "gpt2 untied, blocks only (the root keeps the rest)", model = "gpt2", cfg = {tie_word_embeddings = false},
   plan = {mode = "manual", modules = {["transformer.h.*"] = "free_full_weight"}}},
  {name = "qwen2_moe, auto", model = "qwen2_moe", cfg = {}, plan = "auto"},
  -- examples/custom_plan.lua's: bf16 MLP units nested in blocks, the last two blocks kept, free embeddings whose
  -- tied wte the root's lm_head gathers again at the end of forward, the root keeping ln_f
  {name = "gpt2 tied, function plan with nested bf16 units", model = "gpt2", cfg = {n_layer = 4},
   plan = {modules = function(name)
     local block = tonumber(name:match("^transformer%.h%.(%d+)$"))
     if block then return block >= 2 and "keep_full_weight" or "free_full_weight" end
     local mlp = tonumber(name:match("^transformer%.h%.(%d+)%.mlp$"))
     if mlp then
       return {mlp >= 2 and "keep_full_weight" or "free_full_weight",
               mixed_precision = {param_dtype = "bf16", reduce_dtype = "f32", output_dtype = "f32"}}
     end
     if name == "transformer.wte" or name == "transformer.wpe" then return "free_full_weight" end
     return nil
   end}},
}

-- the shard table's data, without its metatable
local function table_data(t)
  local units = {}
  for i, u in ipairs(t.units) do
    local ps = {}
    for j, p in ipairs(u.params) do
      local ranges, bytes = {}, {}
      for r = 0, t.world_size - 1 do ranges[r + 1] = {p.ranges[r][1], p.ranges[r][2]}; bytes[r + 1] = p.bytes[r] end
      ps[j] = {name = p.name, shape = p.shape, dtype = p.dtype, ranges = ranges, bytes = bytes}
    end
    units[i] = {name = u.name, state = u.state, policy = require("fsdp.parallel.shard_table").policy_str(u), params = ps}
  end
  return {world_size = t.world_size, units = units}
end

local report = {rank = rank, world = world, cases = {}}
local ids = fsdp.tensor({{1, 2, 3, 4, 5, 6, 7, 8}, {8, 7, 6, 5, 4, 3, 2, 1}}, {dtype = "i64"})
-- One case in a function of its own, and the JIT's traces flushed after it: the counters are per process, so the
-- previous case's shards must be gone before the next case's baseline, and a dead local still on the Lua stack or a
-- trace that recorded one of its hooks (trace constants are GC roots) would keep them alive, to be freed mid-case.
local function run_case(case)
  local cfg = fsdp.models.tiny_config(case.model, case.cfg)
  local model = fsdp.models.build(cfg, {device = "meta"})
  local ex = fsdp.explain(model, case.plan, world, case.opts)
  local mem = ex.memory[rank]
  local out = {name = case.name, explained = table_data(ex.table),
               predicted = {param = mem.param, grad = mem.grad, optim = mem.optim,
                            param_unsharded = mem.param_unsharded, step_peaks = ex.memory.step_peaks}}
  local base = {}
  for k, id in pairs(cat) do base[k] = tonumber(C.fl_mem_current(id)) end
  local aopts = {seed = 3}
  for k, v in pairs(case.opts or {}) do aopts[k] = v end
  fsdp.apply_plan(model, case.plan, aopts)
  out.shards = table_data(fsdp.shards(model))
  -- what the engine holds on this rank: each unit's shards as tensors, their first rows from the engine
  local held = {}
  for i, u in ipairs(require("fsdp.parallel.fsdp_module").group(model).units) do
    local ps = {}
    for j, shard in ipairs(u.shards) do
      ps[j] = {first_row = tonumber(C.fl_fsdp_unit_shard_row0(u.ptr, j - 1)), rows = shard:size(1),
               bytes = shard:numel() * tonumber(C.fl_dtype_size(C.fl_dtype_from_name(shard.dtype))),
               dtype = shard.dtype}
    end
    held[i] = ps
  end
  out.held = held
  local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-3})
  out.measured = {}
  for step = 1, 2 do
    fsdp.reset_peak_memory()
    local start_unsharded = tonumber(C.fl_mem_current(cat.param_unsharded))
    local loss = model(ids, {labels = ids}).loss
    loss:backward()
    opt:step()
    local s = fsdp.memory_stats()
    out.measured[step] = {param = s.param.current - base.param, grad = s.grad.current - base.grad,
                          optim = s.optim.current - base.optim,
                          param_unsharded_peak = s.param_unsharded.peak - start_unsharded,
                          param_unsharded_after = s.param_unsharded.current - base.param_unsharded,
                          text = rank == 0 and step == 2 and tostring(s) or nil}
    opt:zero_grad()
    loss:free()
  end
  if rank == 0 then out.explain_text, out.shards_text = tostring(ex), tostring(fsdp.shards(model)) end
  return out
end

for ci, case in ipairs(CASES) do
  report.cases[ci] = run_case(case)
  jit.flush()
  collectgarbage("collect")
  collectgarbage("collect")
end
D.write(dir, rank, report)
