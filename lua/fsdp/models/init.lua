-- lua/fsdp/models/init.lua: `fsdp.models` — Hugging Face configs (defaults, aliases, v4/v5 RoPE keys), building a
-- registered architecture on cpu or meta, and single-process from_pretrained / save_pretrained in HF's layout
-- (config.json + model.safetensors or a sharded index). Sharded (FSDP) loading and saving build on the same pieces.
local cjson  = require "cjson"
local core   = require "fsdp.core"
local st     = require "fsdp.safetensors"
local Tensor = require "fsdp.tensor"

local C = core.C
local M = {}

-- model_type -> architecture file. Each declares defaults, a tiny test config and its FSDP plan.
M.registry = {
  gpt2 = require "fsdp.models.gpt2",
  llama = require "fsdp.models.llama",
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

-- JSON null -> absent, recursively (cjson decodes null as a sentinel).
local function strip_null(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do
    if x ~= cjson.null then out[k] = strip_null(x) end
  end
  return out
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

local function validate(model_type, schema, cfg)
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
        core.raise(("config: %s: %s must be %s, got %s"):format(model_type, k, spec[1],
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
  -- HF attribute_map aliases (GPT-2's hidden_size -> n_embd, ...) are resolved before the defaults fill in.
  for alias, key in pairs(spec.aliases or {}) do
    if o[alias] ~= nil then
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
  validate(model_type, spec.schema, cfg)
  spec.normalize(cfg)
  return cfg
end

-- The tiny config each architecture registers for tests (tied or untied on request).
function M.tiny_config(model_type, overrides)
  local spec = spec_of(model_type, "tiny_config")
  local o = {}
  for k, v in pairs(spec.tiny_config) do o[k] = v end
  for k, v in pairs(overrides or {}) do o[k] = v end
  return M.config(model_type, o)
end

local BUILD_OPTS = {device = true, seed = true, dtype = true}

-- build(cfg, {device = "cpu" | "meta", seed =, dtype =}): the module tree is always made on meta (allocating
-- nothing); on cpu every parameter is then materialised with the counter-based RNG keyed by its HF name.
function M.build(cfg, opts)
  opts = core.check_opts("build", opts, BUILD_OPTS, 2)
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

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

local function read_json(path, what)
  local s, err = read_file(path)
  if not s then core.raise(("%s: cannot read '%s': %s"):format(what, path, tostring(err))) end
  local ok, doc = pcall(cjson.decode, s)
  if not ok then core.raise(("%s: '%s' is not valid JSON: %s"):format(what, path, tostring(doc))) end
  return doc
end

-- Keys older checkpoints carry that are buffers, not parameters; they are skipped on load.
local IGNORED = {"%.attn%.bias$", "%.attn%.masked_bias$", "%.rotary_emb%.inv_freq$"}

local function ignorable(name)
  for _, p in ipairs(IGNORED) do if name:find(p) then return true end end
  return false
end

-- name -> {file =, hdr =} for every tensor of a checkpoint directory (single file or sharded index).
function M.checkpoint_index(dir)
  local single = dir .. "/model.safetensors"
  local index_path = dir .. "/model.safetensors.index.json"
  local out, headers = {}, {}
  local f = io.open(single, "rb")
  if f then
    f:close()
    local hdr = st.header(single)
    for name in pairs(hdr.tensors) do out[name] = {file = single, hdr = hdr} end
    return out
  end
  f = io.open(index_path, "rb")
  if not f then
    core.raise(("from_pretrained: '%s' has neither model.safetensors nor model.safetensors.index.json"):format(dir))
  end
  f:close()
  local idx = read_json(index_path, "from_pretrained")
  if type(idx.weight_map) ~= "table" then
    core.raise(("from_pretrained: '%s' has no weight_map"):format(index_path))
  end
  for name, file in pairs(idx.weight_map) do
    local path = dir .. "/" .. file
    headers[path] = headers[path] or st.header(path)
    if not headers[path].tensors[name] then
      core.raise(("from_pretrained: the index maps '%s' to '%s', which does not hold it"):format(name, file))
    end
    out[name] = {file = path, hdr = headers[path]}
  end
  return out
end

local FP_OPTS = {dtype = true, fsdp_plan = true, mesh = true}

-- from_pretrained(dir, {dtype =, fsdp_plan =, mesh =}): config.json -> the model on meta -> (with fsdp_plan) the
-- plan applied over mesh -> every parameter read from the checkpoint (single file or indexed). Sharded, each
-- rank reads only its own rows of each tensor (a dim-0 shard is one contiguous byte range) into its f32 shards;
-- no rank holds a full tensor. Missing, unexpected and mis-shaped tensors are reported together, before anything
-- is read. Sharded loading is collective over the mesh: every rank must call it.
function M.from_pretrained(dir, opts)
  opts = core.check_opts("from_pretrained", opts, FP_OPTS, 2)
  if opts.mesh ~= nil and opts.fsdp_plan == nil then core.raise("from_pretrained: mesh needs fsdp_plan") end
  local raw = read_json(dir .. "/config.json", "from_pretrained")
  if type(raw.model_type) ~= "string" then
    error(("from_pretrained: '%s/config.json' has no model_type"):format(dir), 2)
  end
  local cfg = M.config(raw.model_type, raw)
  local model = M.build(cfg, {device = "meta", dtype = opts.dtype or "f32"})
  local spec = model.model_spec
  local index = M.checkpoint_index(dir)
  local used, missing, mismatched, plan = {}, {}, {}, {}
  for _, e in ipairs(model:parameter_list()) do
    local name, t = e[1], e[2]
    local key = name
    if not index[key] and spec.base_prefix and name:sub(1, #spec.base_prefix + 1) == spec.base_prefix .. "." then
      key = name:sub(#spec.base_prefix + 2)    -- e.g. openai-community/gpt2: "h.0.attn..." without "transformer."
    end
    local src = index[key]
    if not src then
      missing[#missing + 1] = name
    else
      local te = src.hdr.tensors[key]
      local shape = t:shape()
      if #shape ~= #te.shape or table.concat(shape, ",") ~= table.concat(te.shape, ",") then
        mismatched[#mismatched + 1] = ("'%s' has shape [%s] in %s, the model expects %s"):format(key,
          table.concat(te.shape, ", "), src.file, t:shape_str())
      end
      used[key] = true
      plan[#plan + 1] = {name = name, key = key, src = src, full = t}
    end
  end
  local unexpected = {}
  for name in pairs(index) do
    if not used[name] and not ignorable(name) and not (cfg.tie_word_embeddings and spec.tied[name]) then
      unexpected[#unexpected + 1] = name
    end
  end
  table.sort(unexpected)
  if #missing + #unexpected + #mismatched > 0 then
    local parts = {}
    if #missing > 0 then parts[#parts + 1] = ("lacks %d parameter(s): %s"):format(#missing, table.concat(missing, ", ")) end
    if #unexpected > 0 then
      parts[#parts + 1] = ("holds tensors the %s model does not have: %s"):format(cfg.model_type, table.concat(unexpected, ", "))
    end
    if #mismatched > 0 then parts[#parts + 1] = "has mismatched shapes: " .. table.concat(mismatched, "; ") end
    core.raise(("from_pretrained: '%s' %s"):format(dir, table.concat(parts, "; and ")))
  end
  if opts.fsdp_plan ~= nil then
    -- shard on meta without initialising (every shard is read next), then read each rank's rows
    require("fsdp.parallel").apply_plan(model, opts.fsdp_plan, {mesh = opts.mesh, init = false})
    for _, p in ipairs(plan) do
      local shard = Tensor.local_of(p.full)
      local info = Tensor.shard_info(shard)
      st.read_range_into(p.src.file, p.src.hdr, p.key, shard, info and info.offset or 0)
    end
    return model
  end
  for _, p in ipairs(plan) do
    core.check(C.fl_tensor_storage_alloc(p.full._p), "from_pretrained " .. p.name, 2)
    C.fl_tensor_set_category(p.full._p, core.mem_categories.param)
    st.read_into(p.src.file, p.src.hdr, p.key, p.full)
  end
  return model
end

-- ---- config.json writing: sorted keys, 2-space indent, floats as floats (as transformers writes it) ----
local function num(v, as_float)
  if v ~= v then return "NaN" end
  if v == math.huge then return "Infinity" elseif v == -math.huge then return "-Infinity" end
  if v == math.floor(v) and math.abs(v) < 1e15 then
    return as_float and ("%d.0"):format(v) or ("%d"):format(v)
  end
  for p = 15, 17 do
    local s = ("%." .. p .. "g"):format(v)
    if tonumber(s) == v then return s end
  end
end

local function encode(v, indent, float_keys, key)
  local t = type(v)
  if t == "table" then
    if next(v) == nil then return "{}" end
    local inner = indent .. "  "
    if #v > 0 then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = inner .. encode(x, inner, float_keys, key) end
      return "[\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "]"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys)
    local parts = {}
    for i, k in ipairs(keys) do
      parts[i] = inner .. cjson.encode(k) .. ": " .. encode(v[k], inner, float_keys, k)
    end
    return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
  elseif t == "number" then
    return num(v, float_keys[key])
  elseif t == "string" or t == "boolean" then
    return cjson.encode(v)
  end
  core.raise(("save_pretrained: cannot write a %s in config.json (key %s)"):format(t, tostring(key)))
end

M.encode_json = encode

local TORCH_DTYPE = {f32 = "float32", f64 = "float64", bf16 = "bfloat16", f16 = "float16"}

local function write_atomic(path, text)
  local tmp = core.tmp_name(path)
  local f, err = io.open(tmp, "wb")
  if not f then core.raise(("save_pretrained: cannot create '%s': %s"):format(tmp, tostring(err))) end
  f:write(text)
  f:close()
  local ok, rerr = os.rename(tmp, path)
  if not ok then core.raise(("save_pretrained: cannot rename '%s': %s"):format(tmp, tostring(rerr))) end
end

-- save_pretrained(model, dir): config.json (model_type, architectures, dtype) and model.safetensors with every
-- parameter once under its HF name: a tied head is not written (the embedding key holds it). Each file is written
-- to a temporary name and renamed into place. A sharded model (fsdp.apply_plan / fully_shard) is not gathered:
-- every rank writes its f32 master rows into the one file (see below); every rank must call it, and all return
-- once the files are in place.
function M.save_pretrained(model, dir)
  local spec, cfg = model.model_spec, model.config
  if not spec or not cfg then error("save_pretrained: the model was not built by fsdp.models", 2) end
  if type(dir) ~= "string" then error("save_pretrained: dir must be a string", 2) end
  local sharded = model:is_sharded()
  local dist = require "fsdp.dist"
  local writer = not sharded or dist.rank() == 0
  if writer then
    local ok = os.execute(("mkdir -p '%s'"):format(dir:gsub("'", "'\\''")))
    if ok ~= 0 and ok ~= true then error(("save_pretrained: cannot create directory '%s'"):format(dir), 2) end
  end
  local tensors, dtype = {}, nil
  if sharded then
    dtype = "f32"   -- the f32 master shards
    local names = {}
    for name, shard in model:named_parameters() do names[#names + 1] = name; tensors[name] = shard end
    local full_of = {}
    for _, e in ipairs(model:full_parameter_list()) do full_of[e[1]] = e[2] end
    -- Every rank computes the same layout from the full shapes; each writes its own rows straight into the file
    -- at their byte offsets (a dim-0 shard is one contiguous range): no rank holds a full tensor. The temporary
    -- name is rank 0's, which every rank learns; it is renamed into place after all ranks finished and synced.
    local specs = {}
    for _, name in ipairs(names) do
      specs[#specs + 1] = {name = name, dtype = "f32", shape = full_of[name]:shape()}
    end
    local layout, text, data_start = st.plan(specs, {format = "pt"})
    local final = dir .. "/model.safetensors"
    local pid = Tensor.new({writer and core.pid() or 0}, {dtype = "i64"})
    dist.broadcast(pid, 0)
    local tmp = core.tmp_name(final, pid:get(0))
    if writer then st.write_header(tmp, text) end
    dist.barrier()   -- the file exists before anyone writes into it
    for _, l in ipairs(layout) do
      local shard = tensors[l.name]
      local info = Tensor.shard_info(shard)
      if shard:numel() > 0 then
        local rc = C.fl_st_write_at(tmp, data_start + l.b + (info and info.offset or 0) * 4, core.dtypes.f32, shard._p)
        if rc < 0 then core.raise(("save_pretrained: tensor '%s': %s"):format(l.name, core.last_error())) end
      end
    end
    core.check(C.fl_file_sync(tmp), "save_pretrained")
    dist.barrier()   -- every rank's rows are written and on disk
    if writer then
      local ok, err = os.rename(tmp, final)
      if not ok then core.raise(("save_pretrained: cannot rename '%s' to '%s': %s"):format(tmp, final, tostring(err))) end
    end
  else
    for name, t in model:named_parameters() do
      tensors[name] = t
      dtype = dtype or t.dtype
    end
  end
  if not writer then
    dist.barrier()   -- rank 0 writes config.json; the others return when the files are in place
    return
  end
  local out = {}
  for k, v in pairs(cfg) do out[k] = v end
  out.model_type = spec.model_type
  out.architectures = spec.architectures
  out.dtype = TORCH_DTYPE[dtype] or "float32"
  local fk = {}
  for k in pairs(spec.float_keys or {}) do fk[k] = true end
  write_atomic(dir .. "/config.json", encode(out, "", fk, nil) .. "\n")
  if sharded then
    dist.barrier()
  else
    st.save(dir .. "/model.safetensors", tensors, {format = "pt"})
  end
end

return M
