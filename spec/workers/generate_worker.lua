-- spec/workers/generate_worker.lua: model:generate on a sharded model (from_pretrained with an FSDP plan) on N
-- ranks; every rank writes its greedy sequences of the fixture's generate.safetensors batch and one sampled batch
-- (spec/dist/generate_dist_spec.lua compares them with transformers' and across ranks).
-- Usage: fsdp-lua -n N generate_worker.lua DIR PLAN FIXTURE...   (PLAN: auto | manual)
local fsdp = require "fsdp"
local st   = require "fsdp.safetensors"
local D    = require "dist"

local dir, plan_name = arg[1], arg[2]
fsdp.init{}
local report = {rank = fsdp.rank(), cases = {}}
for i = 3, #arg do
  local fixture = arg[i]
  local plan = plan_name == "manual" and {mode = "manual", modules = {["model.layers.*"] = "free_full_weight",
                                                                      ["model.layers.*.self_attn"] = "free_full_weight"}}
               or "auto"
  if plan_name == "manual" and fixture:match("gpt2") then
    plan = {mode = "manual", modules = {["transformer.h.*"] = "free_full_weight", ["transformer.h.*.attn"] = "free_full_weight"}}
  end
  local m = fsdp.models.from_pretrained(fixture, {fsdp_plan = plan})
  local g = st.load(fixture .. "/generate.safetensors")
  local greedy = m:generate(g.input_ids, {max_new_tokens = 8, attention_mask = g.attention_mask, eos_token_id = {},
                                          pad_token_id = 0})
  local sampled = m:generate(g.input_ids, {max_new_tokens = 8, attention_mask = g.attention_mask, eos_token_id = {},
                                           pad_token_id = 0, temperature = 0.9, top_p = 0.95, seed = 11})
  report.cases[#report.cases + 1] = {fixture = fixture, greedy = greedy:totable(), sampled = sampled:totable(),
                                     sharded = m:is_sharded()}
end
D.write(dir, fsdp.rank(), report)
