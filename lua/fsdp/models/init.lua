-- lua/fsdp/models/init.lua: `fsdp.models` — Hugging Face configs (defaults, aliases, v4/v5 RoPE keys), building a
-- registered architecture on cpu or meta. Loading and saving in HF's layout are fsdp.checkpoint.hf's, reachable
-- here as from_pretrained / save_pretrained.
local cjson  = require "cjson"
local core   = require "fsdp.core"

local M = {}

-- model_type -> architecture file. Each declares defaults, a tiny test config and its FSDP plan.
M.registry = {
  gpt2 = require "fsdp.models.gpt2",
  llama = require "fsdp.models.llama",
  mistral = require "fsdp.models.mistral",
  qwen2 = require "fsdp.models.qwen2",
  qwen3 = require "fsdp.models.qwen3",
  phi3 = require "fsdp.models.phi3",
  mixtral = require "fsdp.models.mixtral",
  qwen2_moe = require "fsdp.models.qwen2_moe",
  qwen3_moe = require "fsdp.models.qwen3_moe",
}

local function spec_of(model_type, what)
  local spec = M.registry[model_type]
  if not spec then
    local names = {}
    for k in pairs(M.registry) do names[#names + 1] = k end
    table.sort(names)
    core.raise(("%s: unknown model_type '%s' (registered: %s)"):format(what, tostring(model_type), table.concat(names, ", ")))
  end
  return spec
end

-- The metatable of a list that must stay a JSON list: lua-cjson 2.1.0 decodes [] and {} alike as an empty table,
-- so fsdp.checkpoint.hf marks each empty list of a config.json with it, and save_pretrained writes it back as [].
M.list_mt = {__name = "json list"}

-- An empty list that config.json writes as [] (models.config(..., {mlp_only_layers = models.empty_list()})).
function M.empty_list() return setmetatable({}, M.list_mt) end

-- JSON null -> absent, recursively (cjson decodes null as a sentinel); list marks are kept.
local function strip_null(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do
    if x ~= cjson.null then out[k] = strip_null(x) end
  end
  return setmetatable(out, getmetatable(v))
end

-- The kinds of config values (an architecture's M.schema maps keys to kinds; a trailing "?" allows nil).
local function is_int(v) return type(v) == "number" and v == math.floor(v) and v > -math.huge and v < math.huge end
local KINDS = {
  size     = {"a positive integer", function(v) return is_int(v) and v >= 1 end},
  nonneg   = {"a number >= 0", function(v) return type(v) == "number" and v >= 0 and v < math.huge end},
  positive = {"a positive number", function(v) return type(v) == "number" and v > 0 and v < math.huge end},
  eps      = {"a positive number", function(v) return type(v) == "number" and v > 0 and v < math.huge end},
  prob     = {"a number in [0, 1)", function(v) return type(v) == "number" and v >= 0 and v < 1 end},
  string   = {"a string", function(v) return type(v) == "string" end},
  bool     = {"a boolean", function(v) return type(v) == "boolean" end},
  token_id = {"a token id (an integer >= 0, or a list of them)", function(v)
    if is_int(v) then return v >= 0 end
    if type(v) ~= "table" or #v == 0 then return false end
    for _, x in ipairs(v) do if not (is_int(x) and x >= 0) then return false end end
    return true
  end},
}

-- names: the key each schema key was given under (an alias such as Qwen3-MoE's num_experts), for the message.
local function validate(model_type, schema, cfg, names)
  names = names or {}
  local keys = {}
  for k in pairs(schema) do keys[#keys + 1] = k end
  table.sort(keys)   -- the first bad key in a stable order
  for _, k in ipairs(keys) do
    local kind = schema[k]
    local optional = kind:sub(-1) == "?"
    local v = cfg[k]
    if not (optional and v == nil) then
      local spec = assert(KINDS[optional and kind:sub(1, -2) or kind], kind)
      if not spec[2](v) then
        core.raise(("config: %s: %s must be %s, got %s"):format(model_type, names[k] or k, spec[1],
              type(v) == "string" and ("'" .. v .. "'") or tostring(v)))
      end
    end
  end
end

-- config(model_type, overrides) -> HF config table: the architecture's defaults, then the overrides (any HF key,
-- as config.json holds them), normalised (aliases, RoPE) and validated.
function M.config(model_type, overrides)
  local spec = spec_of(model_type, "config")
  if overrides ~= nil and type(overrides) ~= "table" then
    error(("config: overrides must be a table, got %s"):format(type(overrides)), 2)
  end
  local o = strip_null(overrides or {})
  -- HF attribute_map aliases (GPT-2's hidden_size -> n_embd, ...) are resolved before the defaults fill in; an
  -- error about the value names the key it came under.
  local names = {}
  for alias, key in pairs(spec.aliases or {}) do
    if o[alias] ~= nil then
      if o[key] == nil then names[key] = alias end
      if o[key] ~= nil and o[key] ~= o[alias] then
        error(("config: %s: %s = %s contradicts %s = %s"):format(model_type, alias, tostring(o[alias]), key,
              tostring(o[key])), 2)
      end
      o[key], o[alias] = o[alias], nil
    end
  end
  local cfg = {}
  for k, v in pairs(spec.defaults) do cfg[k] = v end
  for k, v in pairs(o) do cfg[k] = v end
  if overrides and overrides.model_type ~= nil and overrides.model_type ~= model_type then
    error(("config: overrides say model_type '%s', expected '%s'"):format(tostring(overrides.model_type), model_type), 2)
  end
  cfg.model_type = model_type
  validate(model_type, spec.schema, cfg, names)
  spec.normalize(cfg)
  return cfg
end

-- The tiny config each architecture registers for tests (tied or untied on request).
function M.tiny_config(model_type, overrides)
  local spec = spec_of(model_type, "tiny_config")
  local o = {}
  for k, v in pairs(spec.tiny_config) do o[k] = v end
  for alias, key in pairs(spec.aliases or {}) do   -- an override under either name replaces the tiny value
    if overrides and (overrides[alias] ~= nil or overrides[key] ~= nil) then o[alias], o[key] = nil, nil end
  end
  for k, v in pairs(overrides or {}) do o[k] = v end
  return M.config(model_type, o)
end

local BUILD_OPTS = {device = true, seed = true, dtype = true}

-- build(cfg, {device = "cpu" | "meta", seed =, dtype =}): the module tree is always made on meta (allocating
-- nothing); on cpu every parameter is then materialised with the counter-based RNG keyed by its HF name.
function M.build(cfg, opts)
  opts = core.check_opts("build", opts, BUILD_OPTS, 2)
  require("fsdp.nn.module").check_seed(opts.seed, "build")
  if type(cfg) ~= "table" or not cfg.model_type then error("build: cfg must be a table from fsdp.models.config", 2) end
  local spec = spec_of(cfg.model_type, "build")
  validate(cfg.model_type, spec.schema, cfg)   -- again: the table may have been edited since config()
  local device = opts.device or "cpu"
  if device ~= "cpu" and device ~= "meta" then
    error(("build: unknown device '%s' (valid: cpu, meta)"):format(tostring(device)), 2)
  end
  local model = spec.build(cfg, {device = "meta", dtype = opts.dtype or "f32", seed = opts.seed})
  model.config = cfg
  model.model_spec = spec
  model.fsdp_plan = spec.fsdp_plan
  if device == "cpu" then model:materialize({seed = opts.seed}) end
  return model
end

-- Hugging Face checkpoints (lua/fsdp/checkpoint/hf.lua): loaded lazily, it builds models through this module.
function M.from_pretrained(dir, opts) return require("fsdp.checkpoint.hf").from_pretrained(dir, opts) end
function M.save_pretrained(model, dir, opts) return require("fsdp.checkpoint.hf").save_pretrained(model, dir, opts) end
function M.checkpoint_index(dir) return require("fsdp.checkpoint.hf").checkpoint_index(dir) end

return M
