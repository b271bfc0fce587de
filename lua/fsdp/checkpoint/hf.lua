-- lua/fsdp/checkpoint/hf.lua: Hugging Face checkpoints in and out — from_pretrained and save_pretrained in HF's
-- layout (config.json + model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json),
-- for a plain model, a DDP model and a sharded one, without ever gathering a parameter: a sharded load reads each
-- rank's rows, a sharded save writes each rank's rows at their byte offsets in the final files.
local cjson   = require "cjson"
local ffi     = require "ffi"
local core    = require "fsdp.core"
local st      = require "fsdp.safetensors"
local Tensor  = require "fsdp.tensor"
local models  = require "fsdp.models"
local publish = require "fsdp.checkpoint.publish"

local C = core.C
local M = {}

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

-- lua-cjson 2.1.0 decodes [] and {} alike as an empty table, and a re-saved config would turn Qwen-MoE's
-- "mlp_only_layers": [] into {} (which transformers refuses). So each empty list of the text is decoded as a
-- one-element list of this marker first, and then becomes an empty table under models.list_mt. (A JSON string
-- that decodes to exactly the marker, alone in a list, would be taken for an empty list.)
local EMPTY = "\0fsdp: empty list"

local function mark_empty_lists(s)
  local parts, from, pos = {}, 1, 1
  while true do
    local j = s:find('[%["]', pos)
    if not j then break end
    if s:byte(j) == 34 then          -- a string: skip to its closing quote, past escapes
      local k = j + 1
      while true do
        local q = s:find('[\\"]', k)
        if not q then return s end   -- unterminated: cjson reports it
        if s:byte(q) == 92 then k = q + 2 else pos = q + 1; break end
      end
    else
      local after = s:match("^%[%s*%]()", j)
      if after then
        parts[#parts + 1] = s:sub(from, j - 1) .. '["\\u0000fsdp: empty list"]'
        from = after
      end
      pos = after or j + 1
    end
  end
  parts[#parts + 1] = s:sub(from)
  return table.concat(parts)
end

local function unmark(v)
  if type(v) ~= "table" then return v end
  if v[1] == EMPTY and #v == 1 and next(v, next(v)) == nil then return setmetatable({}, models.list_mt) end
  for k, x in pairs(v) do v[k] = unmark(x) end
  return v
end

-- The JSON text of a config as Lua tables, empty lists kept as lists.
function M.decode_config(text)
  return unmark(cjson.decode(mark_empty_lists(text)))
end

local function read_json(path, what, decode)
  local s, err = read_file(path)
  if not s then core.raise(("%s: cannot read '%s': %s"):format(what, path, tostring(err))) end
  local ok, doc = pcall(decode or cjson.decode, s)
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

-- The key of the checkpoint that holds parameter `name`: its own, or (a base model's checkpoint, such as
-- openai-community/gpt2: "h.0.attn..." without "transformer.") the name without spec.base_prefix.
local function key_of(index, spec, name)
  if index[name] then return name end
  local p = spec.base_prefix
  if p and name:sub(1, #p + 1) == p .. "." and index[name:sub(#p + 2)] then return name:sub(#p + 2) end
  return nil
end

-- Whether stored tensors ka and kb (entries of checkpoint_index) hold the same values: the same dtype, shape and
-- bytes, compared a MiB at a time. (transformers compares the loaded parameters; a head stored in another dtype
-- than the embedding counts as different here, and loads untied with the same values.)
local function same_tensor(index, ka, kb)
  local ea, eb = index[ka].hdr.tensors[ka], index[kb].hdr.tensors[kb]
  if ea.dtype ~= eb.dtype or table.concat(ea.shape, ",") ~= table.concat(eb.shape, ",") then return false end
  local function open(path)
    local f, err = io.open(path, "rb")
    if not f then core.raise(("from_pretrained: cannot read '%s': %s"):format(path, tostring(err))) end
    return f
  end
  local fa, fb = open(index[ka].file), open(index[kb].file)
  fa:seek("set", ea.offset); fb:seek("set", eb.offset)
  local left, same = ea.nbytes, true
  while left > 0 and same do
    local n = math.min(left, 2 ^ 20)
    same = fa:read(n) == fb:read(n)
    left = left - n
  end
  fa:close(); fb:close()
  return same
end

-- tie_word_embeddings over what the files hold, as transformers 5 ties on load (PreTrainedModel.tie_weights):
-- both tensors stored and equal, or only the embedding: tied. Only the head stored: tied, the embedding read from
-- the head's key (returned as {embedding name = head key}). Both stored and different: the config is wrong about
-- the files, so the model keeps both, untied (cfg.tie_word_embeddings becomes false, which save_pretrained then
-- writes), and says so once on stderr (rank 0).
local function resolve_tying(dir, cfg, spec, index)
  local read_from = {}
  if not cfg.tie_word_embeddings then return read_from end
  for head, emb in pairs(spec.tied) do
    local hk, ek = key_of(index, spec, head), key_of(index, spec, emb)
    if hk and ek and not same_tensor(index, hk, ek) then
      cfg.tie_word_embeddings = false
      local dist = require "fsdp.dist"
      if not dist.is_initialized() or dist.rank() == 0 then
        io.stderr:write(("fsdp: from_pretrained: '%s/config.json' sets tie_word_embeddings, but the checkpoint "
          .. "holds %s and %s with different values: both are loaded, untied, as transformers does (the model's "
          .. "config now says tie_word_embeddings = false)\n"):format(dir, hk, ek))
        io.stderr:flush()
      end
    elseif hk and not ek then
      read_from[emb] = hk
    end
  end
  return read_from
end

local FP_OPTS = {dtype = true, fsdp_plan = true, mesh = true}

-- from_pretrained(dir, {dtype =, fsdp_plan =, mesh =}): config.json -> the model on meta -> (with fsdp_plan) the
-- plan applied over mesh -> every parameter read from the checkpoint (single file or indexed). Sharded, each
-- rank reads only its own rows of each tensor (a dim-0 shard is one contiguous byte range) into its f32 shards;
-- no rank holds a full tensor. Missing, unexpected and mis-shaped tensors are reported together, before anything
-- is read. A config that ties the head over files that store one is resolved as transformers does (resolve_tying).
-- Sharded loading is collective over the mesh: every rank must call it.
function M.from_pretrained(dir, opts)
  opts = core.check_opts("from_pretrained", opts, FP_OPTS, 2)
  if opts.mesh ~= nil and opts.fsdp_plan == nil then core.raise("from_pretrained: mesh needs fsdp_plan") end
  local raw = read_json(dir .. "/config.json", "from_pretrained", M.decode_config)
  if type(raw.model_type) ~= "string" then
    error(("from_pretrained: '%s/config.json' has no model_type"):format(dir), 2)
  end
  local cfg = models.config(raw.model_type, raw)
  local index = M.checkpoint_index(dir)
  local read_from = resolve_tying(dir, cfg, models.registry[cfg.model_type], index)
  local model = models.build(cfg, {device = "meta", dtype = opts.dtype or "f32"})
  local spec = model.model_spec
  local used, missing, mismatched, plan = {}, {}, {}, {}
  for _, e in ipairs(model:parameter_list()) do
    local name, t = e[1], e[2]
    local key = key_of(index, spec, name) or read_from[name] or name
    local src, offset, fused = index[key], 0, false
    if not src and spec.fused_source then
      -- an MoE expert in a fused checkpoint: its rows are one contiguous range of the fused tensor
      local fkey, foff, fshape = spec.fused_source(model.config, name)
      if fkey and index[fkey] then
        local te = index[fkey].hdr.tensors[fkey]
        if table.concat(te.shape, ",") ~= table.concat(fshape, ",") then
          mismatched[#mismatched + 1] = ("'%s' has shape [%s] in %s, the model expects [%s]"):format(fkey,
            table.concat(te.shape, ", "), index[fkey].file, table.concat(fshape, ", "))
          used[fkey] = true
          goto continue
        end
        key, src, offset, fused = fkey, index[fkey], foff, true
      end
    end
    if not src then
      missing[#missing + 1] = name
    elseif fused then   -- the fused tensor's shape was checked above
      used[key] = true
      plan[#plan + 1] = {name = name, key = key, src = src, full = t, offset = offset}
    else
      local te = src.hdr.tensors[key]
      local shape = t:shape()
      if #shape ~= #te.shape or table.concat(shape, ",") ~= table.concat(te.shape, ",") then
        mismatched[#mismatched + 1] = ("'%s' has shape [%s] in %s, the model expects %s"):format(key,
          table.concat(te.shape, ", "), src.file, t:shape_str())
      end
      used[key] = true
      plan[#plan + 1] = {name = name, key = key, src = src, full = t, offset = 0}
    end
    ::continue::
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
      st.read_range_into(p.src.file, p.src.hdr, p.key, shard, p.offset + (info and info.offset or 0))
    end
    return model
  end
  for _, p in ipairs(plan) do
    core.check(C.fl_tensor_storage_alloc(p.full._p), "from_pretrained " .. p.name, 2)
    C.fl_tensor_set_category(p.full._p, core.mem_categories.param)
    st.read_range_into(p.src.file, p.src.hdr, p.key, p.full, p.offset)
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

-- encode(v, indent, float_keys, key, list_keys): an empty table is [] when it carries models.list_mt (an empty
-- list of a config.json read back) or sits under one of list_keys, and {} otherwise.
local function encode(v, indent, float_keys, key, list_keys)
  local t = type(v)
  if t == "table" then
    if next(v) == nil then
      return (getmetatable(v) == models.list_mt or (list_keys and list_keys[key])) and "[]" or "{}"
    end
    local inner = indent .. "  "
    if #v > 0 then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = inner .. encode(x, inner, float_keys, key, list_keys) end
      return "[\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "]"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys)
    local parts = {}
    for i, k in ipairs(keys) do
      parts[i] = inner .. cjson.encode(k) .. ": " .. encode(v[k], inner, float_keys, k, list_keys)
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

-- The config keys whose value is a list in transformers (hf-models.md): empty, they are still written as [].
local LIST_KEYS = {architectures = true, layer_types = true, mlp_only_layers = true, bos_token_id = true,
                   eos_token_id = true, pad_token_id = true}

local TORCH_DTYPE = {f32 = "float32", f64 = "float64", bf16 = "bfloat16", f16 = "float16"}
local ELEM_SIZE = {f32 = 4, f64 = 8, bf16 = 2, f16 = 2}

-- max_shard_size as transformers reads it (convert_file_size_to_int): bytes, or a string "<n><unit>" with decimal
-- units KB/MB/GB/TB (10^3k), binary KiB/MiB/GiB/TiB (2^10k), and a lowercase trailing "b" meaning bits.
local UNITS = {B = 1, KB = 1e3, MB = 1e6, GB = 1e9, TB = 1e12, KIB = 2 ^ 10, MIB = 2 ^ 20, GIB = 2 ^ 30, TIB = 2 ^ 40}
M.DEFAULT_MAX_SHARD_SIZE = "50GB"   -- transformers v5's default

function M.parse_size(v, what)
  if type(v) == "number" and v >= 1 and v == math.floor(v) and v < 2 ^ 53 then return v end
  if type(v) == "string" then
    local n, unit = v:match("^%s*(%d+%.?%d*)%s*(%a+)%s*$")
    local scale = unit and UNITS[unit:upper()]
    if n and scale then
      local bytes = math.floor(tonumber(n) * scale)
      if unit:sub(-1) == "b" and unit:upper() ~= "B" then bytes = math.floor(bytes / 8) end
      if bytes >= 1 then return bytes end
    end
  end
  core.raise(("%s: max_shard_size must be a positive number of bytes or a size such as \"5GB\" or \"500MiB\", got %s")
             :format(what, type(v) == "string" and ("'" .. v .. "'") or tostring(v)))
end

-- Greedy split in state-dict order, as transformers (huggingface_hub's split_torch_state_dict_into_shards): a
-- tensor goes into the current file unless it would push it past the limit; one larger than the limit gets a file
-- of its own. Returns a list of files, each a list of entries.
local function split(entries, max_bytes)
  local files, cur, size = {}, nil, 0
  for _, e in ipairs(entries) do
    if e.bytes > max_bytes then
      files[#files + 1] = {e}
    else
      if cur == nil or size + e.bytes > max_bytes then
        cur, size = {}, 0
        files[#files + 1] = cur
      end
      cur[#cur + 1] = e
      size = size + e.bytes
    end
  end
  if #files == 0 then files[1] = {} end
  return files
end

-- The files save_pretrained owns in a directory (replaced on save; everything else there is kept).
local function owned(name)
  return name == "config.json" or name == "model.safetensors" or name == "model.safetensors.index.json"
      or name:match("^model%-%d%d%d%d%d%-of%-%d%d%d%d%d%.safetensors$") ~= nil
end
M.owned = owned

-- What this rank writes of each parameter: the elements [offset, offset + src:numel()) of the full tensor, from
-- src. Sharded: its FSDP shard (under HSDP only the first replica writes; the others hold copies of the same
-- rows). DDP: every replica holds everything, so each writes the rows fl_shard_rows gives it and the writing is
-- split evenly. Plain: all of it.
local function my_part(full, shard, mode, ctx)
  if mode == "sharded" then
    if not ctx.first_replica then return nil end
    local info = Tensor.shard_info(shard)
    return shard, info and info.offset or 0
  elseif mode == "ddp" then
    local shape = full:shape()
    if #shape == 0 then return ctx.rank == 0 and full or nil, 0 end
    C.fl_shard_rows(shape[1], ctx.world, ctx.rank, ctx.row0, ctx.nrows)
    local r0, n = tonumber(ctx.row0[0]), tonumber(ctx.nrows[0])
    if n == 0 then return nil end
    return full:narrow(1, r0 + 1, n), r0 * (full:numel() / shape[1])
  end
  return full, 0
end

local SAVE_OPTS = {max_shard_size = true, dtype = true}

-- save_pretrained(model, dir, {max_shard_size = "50GB", dtype =}): config.json (HF's keys plus model_type,
-- architectures and dtype) and the weights, every parameter once under its HF name (a tied head is not written:
-- the embedding's key holds it, as transformers writes it). Past max_shard_size the weights are split into
-- model-0000i-of-0000n.safetensors with model.safetensors.index.json. dtype: the file dtype ("f32", "bf16", "f16";
-- default the parameters' dtype, and f32 for a sharded model: its f32 masters). A sharded or DDP model is saved
-- collectively (every rank calls it): rank 0 writes the headers, then every rank writes its own rows straight into
-- the files at their byte offsets; nobody gathers. The directory is published atomically (checkpoint/publish.lua):
-- a save killed at any point leaves the previous checkpoint in `dir` intact.
function M.save_pretrained(model, dir, opts)
  opts = core.check_opts("save_pretrained", opts, SAVE_OPTS, 2)
  if type(model) ~= "table" or not model.model_spec or not model.config then
    core.raise("save_pretrained: the model was not built by fsdp.models")
  end
  if type(dir) ~= "string" or dir == "" then core.raise("save_pretrained: dir must be a non-empty string") end
  local max_bytes = M.parse_size(opts.max_shard_size or M.DEFAULT_MAX_SHARD_SIZE, "save_pretrained")
  if opts.dtype ~= nil and not ELEM_SIZE[opts.dtype] then
    core.raise(("save_pretrained: dtype must be one of f32, bf16, f16, f64, got %s"):format(tostring(opts.dtype)))
  end
  local spec, cfg = model.model_spec, model.config
  local mode = model:is_sharded() and "sharded" or rawget(model, "ddp") and "ddp" or "plain"
  local dist = require "fsdp.dist"
  local collective = mode ~= "plain"
  local ctx = {rank = collective and dist.rank() or 0, world = collective and dist.world_size() or 1,
               row0 = ffi.new("int64_t[1]"), nrows = ffi.new("int64_t[1]"), first_replica = true}
  if mode == "sharded" then
    local mesh = require("fsdp.parallel.fsdp_module").group(model).mesh
    if mesh and mesh._dims and mesh._dims.dp_replicate then ctx.first_replica = mesh:coordinate("dp_replicate") == 0 end
  end
  local full_of = {}
  for _, e in ipairs(model:full_parameter_list()) do full_of[e[1]] = e[2] end
  local entries, total_params, model_dtype = {}, 0, nil
  for name, t in model:named_parameters() do
    local full = full_of[name]
    local dtype = opts.dtype or (mode == "sharded" and "f32" or t.dtype)
    if not ELEM_SIZE[dtype] then
      core.raise(("save_pretrained: parameter '%s' is %s, which a checkpoint cannot hold (pass dtype =)"):format(name, dtype))
    end
    model_dtype = model_dtype or dtype
    local numel = full:numel()
    entries[#entries + 1] = {name = name, dtype = dtype, shape = full:shape(), bytes = numel * ELEM_SIZE[dtype],
                             full = full, shard = t}
    total_params = total_params + numel
  end
  local files = split(entries, max_bytes)
  local n = #files
  local total_size = 0
  for i, list in ipairs(files) do
    local fname = n == 1 and "model.safetensors" or ("model-%05d-of-%05d.safetensors"):format(i, n)
    local layout, text, data_start = st.plan(list, {format = "pt"})
    files[i] = {name = fname, layout = layout, header = text, data_start = data_start, entries = list}
    for _, e in ipairs(list) do total_size = total_size + e.bytes end
  end

  local out = {}
  for k, v in pairs(cfg) do out[k] = v end
  out.model_type = spec.model_type
  out.architectures = spec.architectures
  out.dtype = TORCH_DTYPE[model_dtype or "f32"]
  local fk = {}
  for k in pairs(spec.float_keys or {}) do fk[k] = true end

  publish.write_dir(dir, {what = "save_pretrained", collective = collective, owns = owned}, {
    function(stage)   -- rank 0: config.json, the index and every file's header (the files exist before rows land)
      if ctx.rank ~= 0 then return end
      local written = {}
      local function text_file(name, text)
        local path = stage .. "/" .. name
        local f, err = io.open(path, "wb")
        if not f then core.raise(("save_pretrained: cannot create '%s': %s"):format(path, tostring(err))) end
        local ok, werr = f:write(text)
        f:close()
        if not ok then core.raise(("save_pretrained: cannot write '%s': %s"):format(path, tostring(werr))) end
        written[#written + 1] = path
      end
      text_file("config.json", encode(out, "", fk, nil, LIST_KEYS) .. "\n")
      if n > 1 then
        local map = {}
        for _, f in ipairs(files) do for _, e in ipairs(f.entries) do map[e.name] = f.name end end
        text_file("model.safetensors.index.json", encode({metadata = {total_parameters = total_params,
          total_size = total_size}, weight_map = map}, "", {}, nil) .. "\n")
      end
      for _, f in ipairs(files) do
        st.write_header(stage .. "/" .. f.name, f.header)
        written[#written + 1] = stage .. "/" .. f.name
      end
      return written
    end,
    function(stage)   -- every rank: its rows of every tensor, at their byte offsets
      local touched = {}
      for _, f in ipairs(files) do
        local path = stage .. "/" .. f.name
        for _, l in ipairs(f.layout) do
          local src, offset = my_part(l.spec.full, l.spec.shard, mode, ctx)
          if src and src:numel() > 0 then
            local at = f.data_start + l.b + offset * ELEM_SIZE[l.dtype]
            local rc = C.fl_st_write_at(path, at, core.dtypes[l.dtype], src._p)
            if rc < 0 then core.raise(("save_pretrained: tensor '%s': %s"):format(l.name, core.last_error())) end
            touched[path] = true
          end
        end
      end
      local list = {}
      for path in pairs(touched) do list[#list + 1] = path end
      table.sort(list)
      return list
    end,
  })
  -- The phase closures hold `files` (and through it every parameter) as an upvalue, and a compiled
  -- trace can keep a closure alive long after the call: drop the tensors now, or a freed model's memory stays.
  files = nil
end

return M
