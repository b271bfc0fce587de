-- spec/workers/hf_save_worker.lua: save_pretrained of a trained model on N ranks, every way a job holds it, and the
-- sharded load back; spec/dist/hf_save_spec.lua compares the files with one process's save of the same weights.
-- Usage: fsdp-lua -n N hf_save_worker.lua DIR MODE [KILL]
--   MODE   fsdp (auto plan) | manual (one unit per block and per MLP) | mp (auto, bf16 params: the f32 masters are
--          saved) | ddp | hsdp (mesh 2 x 2, 4 ranks)
--   After one AdamW step (every rank on its own batch), it saves DIR/single (defaults), DIR/indexed
--   (max_shard_size "20KB") and DIR/bf16 (dtype "bf16", "20KB"); rank 0 writes the weights it saved to
--   DIR/full.safetensors; then every rank loads DIR/indexed sharded (auto plan) and reports the bytes it read and
--   the bytes its shards and the headers hold; rank 0 writes the reloaded weights to DIR/reloaded.safetensors.
--   KILL = PHASE:RANK: after saving DIR/single, it trains another step and saves DIR/single again, and RANK kills
--   itself (SIGKILL) right after its part of publish phase PHASE (1: rank 0 wrote the headers; 2: the rows).
--   KILL = PHASE:RANK:error: RANK raises an error there instead; every rank reports what save_pretrained raised.
local fsdp    = require "fsdp"
local D       = require "dist"
local core    = require "fsdp.core"
local publish = require "fsdp.checkpoint.publish"

local dir, mode, kill = arg[1], arg[2], arg[3]
fsdp.init{seed = 3}
local rank = fsdp.rank()
local cfg = fsdp.models.tiny_config("gpt2", {vocab_size = 97, n_embd = 40, n_head = 4})

local model
if mode == "ddp" then
  model = fsdp.ddp(fsdp.models.build(cfg, {seed = 5}))
else
  model = fsdp.models.build(cfg, {device = "meta", seed = 5})
  local plan = mode == "manual" and {mode = "manual", modules = {["transformer.h.*"] = "free_full_weight",
                                                                 ["transformer.h.*.mlp"] = "free_full_weight"}} or "auto"
  local mesh = mode == "hsdp" and fsdp.mesh{dp_replicate = 2, dp_shard = 2} or nil
  local mp = mode == "mp" and {param_dtype = "bf16", reduce_dtype = "f32"} or nil
  fsdp.apply_plan(model, plan, {seed = 5, mesh = mesh, mixed_precision = mp})
end
local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2})
local function train_step()
  local ids = fsdp.tensor({{1 + rank, 5, 9, 2, 7, 3 + rank}}, {dtype = "i64"})
  model(ids, {labels = ids}).loss:backward()
  opt:step(); opt:zero_grad()
end
train_step()

local function weights()
  if model:is_sharded() then return model:full_state_dict({rank0_only = true}) end
  local out = {}
  for name, p in model:named_parameters() do out[name] = p end
  return out
end

if kill then
  local phase, victim, how = kill:match("^(%d):(%d):?(%a*)$")
  phase, victim = tonumber(phase), tonumber(victim)
  fsdp.models.save_pretrained(model, dir .. "/single")
  local before = weights()
  if rank == 0 then fsdp.safetensors.save(dir .. "/before.safetensors", before) end
  train_step()
  local real = publish.write_dir
  publish.write_dir = function(d, opts, phases)
    local wrapped = {}
    for i, ph in ipairs(phases) do
      wrapped[i] = function(stage)
        local r = ph(stage)
        if i == phase and rank == victim and how == "error" then
          error("disk on fire (injected)")
        elseif i == phase and rank == victim then
          io.stderr:write(("rank %d: killing myself after phase %d\n"):format(rank, i))
          os.execute("kill -9 " .. core.pid())
        end
        return r
      end
    end
    return real(d, opts, wrapped)
  end
  local ok, err = pcall(fsdp.models.save_pretrained, model, dir .. "/single")
  if how ~= "error" then error("unreachable: the save should have been killed") end
  D.write(dir, rank, {rank = rank, ok = ok, err = tostring(err)})
  return
end

fsdp.models.save_pretrained(model, dir .. "/single")
fsdp.models.save_pretrained(model, dir .. "/indexed", {max_shard_size = "20KB"})
fsdp.models.save_pretrained(model, dir .. "/bf16", {dtype = "bf16", max_shard_size = "20KB"})
local full = weights()
if rank == 0 then fsdp.safetensors.save(dir .. "/full.safetensors", full) end

-- the sharded load of the indexed files: what each rank read against what its shards and the headers hold
local index = fsdp.models.checkpoint_index(dir .. "/indexed")
local header_bytes, seen = 0, {}
for _, src in pairs(index) do
  if not seen[src.file] then seen[src.file] = true; header_bytes = header_bytes + src.hdr.data_start end
end
fsdp.C.fl_st_reset_bytes_read()
local loaded = fsdp.models.from_pretrained(dir .. "/indexed", {fsdp_plan = "auto"})
local report = {rank = rank, bytes_read = tonumber(fsdp.C.fl_st_bytes_read()), header_bytes = header_bytes,
                shard_bytes = 0, full_bytes = 0}
for _, p in ipairs(loaded:parameters()) do report.shard_bytes = report.shard_bytes + 4 * p:numel() end
for _, e in ipairs(loaded:full_parameter_list()) do report.full_bytes = report.full_bytes + 4 * e[2]:numel() end
local reloaded = loaded:full_state_dict({rank0_only = true})
if rank == 0 then fsdp.safetensors.save(dir .. "/reloaded.safetensors", reloaded) end
D.write(dir, rank, report)
