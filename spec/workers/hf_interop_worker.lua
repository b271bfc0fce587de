-- spec/workers/hf_interop_worker.lua: loads Hugging Face checkpoint directories on N ranks and saves them again,
-- all in one launch. At 1 rank it uses plain from_pretrained(dir); at N > 1, from_pretrained(dir, {fsdp_plan =})
-- under three plans: "auto", "declared" (the model's own fsdp_plan) and a manual one (blocks plus a sub-module of
-- each block). For each checkpoint and plan every rank writes the logits of the checkpoint's expected input_ids,
-- and save_pretrained writes the model back. spec/dist/hf_interop_spec.lua and spec/reference/check_interop.py
-- compare what it wrote with transformers.
--
-- Usage: fsdp-lua -n N hf_interop_worker.lua DIR MODE CKPT_DIR...
--   MODE spec:      per checkpoint NAME (its directory's basename) and plan P:
--                     DIR/NAME.P.r<rank>.safetensors   logits (f32 [B,T,V]) of every rank
--                     DIR/NAME.P.f32/                  save_pretrained(model, that dir)
--   MODE reference: the same, and save_pretrained with {max_shard_size = "20KB"} (DIR/NAME.P.indexed/) and
--                   {dtype = "bf16"} (DIR/NAME.P.bf16/) where save_pretrained accepts those options; every
--                   directory written is loaded back (same plan) and its logits written beside it as
--                   DIR/NAME.P.<variant>.logits.safetensors (rank 0); case.reload[variant] says "ok" or why not.
-- Each rank's result (D.write, and DIR/rank<R>.json): {world =, cases = {{name =, plan =, shard_numel =,
--   full_numel =, variants = {f32 = "ok", indexed = "ok" | "not supported yet: <why>", bf16 = ...}}}}.
local cjson = require "cjson"
local fsdp  = require "fsdp"
local st    = require "fsdp.safetensors"
local D     = require "dist"

local dir, mode = arg[1], arg[2]
local ckpts = {}
for i = 3, #arg do ckpts[#ckpts + 1] = arg[i] end
assert(mode == "spec" or mode == "reference", "MODE must be spec or reference, got " .. tostring(mode))
assert(#ckpts > 0, "no checkpoint directories given")

fsdp.init{}
local rank, world = fsdp.rank(), fsdp.world_size()

-- A manual plan per architecture: each block a unit, and inside it one sub-module a unit of its own.
local MANUAL = {
  gpt2  = {mode = "manual", modules = {["transformer.h.*"] = "free_full_weight", ["transformer.h.*.mlp"] = "keep_full_weight"}},
  llama = {mode = "manual", modules = {["model.layers.*"] = "free_full_weight", ["model.layers.*.self_attn"] = "free_full_weight"}},
}

local function model_type_of(ckpt)
  local f = assert(io.open(ckpt .. "/config.json", "rb"))
  local cfg = cjson.decode(f:read("*a"))
  f:close()
  return cfg.model_type
end

local function load(ckpt, plan_name)
  if plan_name == "none" then return fsdp.models.from_pretrained(ckpt) end
  -- every Llama-family model (Mistral, Qwen, Phi-3, the MoE models) has Llama's module names
  local plan = plan_name == "manual" and (MANUAL[model_type_of(ckpt)] or MANUAL.llama) or plan_name
  return fsdp.models.from_pretrained(ckpt, {fsdp_plan = plan})
end

local function logits_of(model, ids)
  return fsdp.no_grad(function() return model(ids).logits end)
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- Did save_pretrained(model, out, opts) do what opts asked? nil when yes, else why not. An unknown option must
-- raise; a save that ignored the option (wrote a single f32 file anyway) counts as not supported either.
local VARIANTS = {
  {name = "indexed", opts = {max_shard_size = "20KB"}, check = function(out)
    if not exists(out .. "/model.safetensors.index.json") then return "no model.safetensors.index.json written" end
  end},
  {name = "bf16", opts = {dtype = "bf16"}, check = function(out)
    local path = out .. "/model.safetensors"
    if not exists(path) then return "no model.safetensors written" end
    local hdr = st.header(path)
    for _, n in ipairs(hdr.names) do
      if hdr.tensors[n].dtype ~= "BF16" then return ("'%s' written as %s"):format(n, hdr.tensors[n].dtype) end
    end
  end},
}

local function save_variant(model, out, v)
  local ok, err = pcall(fsdp.models.save_pretrained, model, out, v.opts)
  -- every rank reaches the same verdict: the option is rejected everywhere or written everywhere
  if not ok then
    local msg = tostring(err)
    if msg:find("unknown option", 1, true) or msg:find("too many arguments", 1, true) then
      return "not supported yet: " .. msg
    end
    error(("save_pretrained(%s, %s): %s"):format(out, cjson.encode(v.opts), msg), 0)
  end
  fsdp.dist.barrier()   -- rank 0's files are complete before anyone inspects them
  local why = v.check(out)
  if not why then return "ok" end
  fsdp.dist.barrier()   -- every rank has looked before rank 0 removes what the option did not make
  if rank == 0 then os.execute("rm -rf " .. D.quote(out)) end
  return ("not supported yet: save_pretrained accepted %s but %s"):format(cjson.encode(v.opts), why)
end

local report = {world = world, cases = {}}
local plans = world == 1 and {"none"} or {"auto", "declared", "manual"}
for _, ckpt in ipairs(ckpts) do
  local name = ckpt:match("([^/]+)/*$")
  local ids = st.load(ckpt .. "/expected.safetensors", {names = {"input_ids"}}).input_ids
  for _, plan in ipairs(plans) do
    local model = load(ckpt, plan)
    local case = {name = name, plan = plan, shard_numel = 0, full_numel = 0, variants = {}}
    for _, p in ipairs(model:parameters()) do case.shard_numel = case.shard_numel + p:numel() end
    for _, e in ipairs(model:full_parameter_list()) do case.full_numel = case.full_numel + e[2]:numel() end
    local base = ("%s/%s.%s"):format(dir, name, plan)
    st.save(("%s.r%d.safetensors"):format(base, rank), {logits = logits_of(model, ids)})
    fsdp.models.save_pretrained(model, base .. ".f32")
    case.variants.f32 = "ok"
    if mode == "reference" then
      for _, v in ipairs(VARIANTS) do case.variants[v.name] = save_variant(model, base .. "." .. v.name, v) end
      case.reload = {}
      for _, vname in ipairs {"f32", "indexed", "bf16"} do   -- in order: loading is collective
        if case.variants[vname] == "ok" then
          -- a checkpoint we cannot read back is recorded (and fails the check), so that transformers still gets
          -- to say what it thinks of the same directory
          local ok, err = pcall(function()
            local logits = logits_of(load(base .. "." .. vname, plan), ids)
            if rank == 0 then st.save(("%s.%s.logits.safetensors"):format(base, vname), {logits = logits}) end
          end)
          case.reload[vname] = ok and "ok" or tostring(err)
        end
      end
    end
    report.cases[#report.cases + 1] = case
    collectgarbage()
  end
end
D.write(dir, rank, report)
-- the same as JSON, for spec/reference/check_interop.py
local f = assert(io.open(("%s/rank%d.json"):format(dir, rank), "wb"))
f:write(cjson.encode(report), "\n")
f:close()
