-- spec/workers/memorize_worker.lua: every registered model (its tiny config) sharded with the auto plan under mixed
-- precision (bf16 params, f32 reduce) memorises one sequence in 40 AdamW steps; each rank writes the first and last
-- losses and how many of the sequence's next tokens the model then predicts (spec/dist/model_suite_spec.lua).
-- Usage: fsdp-lua -n N memorize_worker.lua DIR
local fsdp = require "fsdp"
local D    = require "dist"

local dir = arg[1]
fsdp.init{seed = 2}
local report = {rank = fsdp.rank(), models = {}}
local names = {}
for mt in pairs(fsdp.models.registry) do names[#names + 1] = mt end
table.sort(names)
local T, STEPS = 24, 40
for _, mt in ipairs(names) do
  local cfg = fsdp.models.tiny_config(mt)
  local model = fsdp.models.build(cfg, {device = "meta", seed = 3})
  fsdp.apply_plan(model, "auto", {seed = 3, mixed_precision = {param_dtype = "bf16", reduce_dtype = "f32"}})
  local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-2, weight_decay = 0.0})
  -- one fixed sequence, the same on every rank
  local seq = {}
  local x = 17
  for i = 1, T do x = (x * 1103515245 + 12345) % 2147483648; seq[i] = math.floor(x / 65536) % cfg.vocab_size end
  local ids = fsdp.tensor({seq}, {dtype = "i64"})
  local losses = {}
  for step = 1, STEPS do
    local out = model(ids, {labels = ids})
    out.loss:backward()
    losses[step] = out.loss:item()
    opt:step(); opt:zero_grad()
  end
  local logits = fsdp.no_grad(function() model:eval(); local l = model(ids).logits; model:train(); return l end)
  local _, pred = fsdp.F.max(logits, 3)
  local p = pred:totable()
  local right = 0
  for t = 1, T - 1 do if p[t] == seq[t + 1] then right = right + 1 end end
  report.models[mt] = {first = losses[1], last = losses[STEPS], right = right, total = T - 1,
                       param_dtype = model:parameters()[1].dtype}
end
D.write(dir, fsdp.rank(), report)
