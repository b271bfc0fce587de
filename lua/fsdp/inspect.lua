-- lua/fsdp/inspect.lua: `fsdp-lua inspect PATH [--tensor NAME]` (engine/cli/main.c calls main). Summarises a Hugging
-- Face checkpoint directory (config.json and model.safetensors or an indexed set), a training checkpoint directory
-- (metadata.json and one rank-*.safetensors per rank, checkpoint/train.lua's layout) or one .safetensors file;
-- --tensor prints that tensor (assembled from every rank's rows for a training checkpoint) and its statistics.
-- Every file is read through the checkpoint readers (safetensors.lua validates each header); a malformed checkpoint
-- is reported in one line naming the file and what is wrong, and the exit status is 1 (2 for a usage error).
local ffi    = require "ffi"
local cjson  = require "cjson"
local core   = require "fsdp.core"
local Tensor = require("fsdp").Tensor   -- with the ops' methods (view, narrow, to)
local st     = require "fsdp.safetensors"
local ST     = require "fsdp.parallel.shard_table"
local train  = require "fsdp.checkpoint.train"

local C = core.C
local M = {}

local USAGE = [[usage: fsdp-lua inspect PATH [--tensor NAME]
  PATH   a Hugging Face checkpoint directory (config.json + model.safetensors or model.safetensors.index.json),
         a training checkpoint directory (metadata.json + rank-*.safetensors, from fsdp.checkpoint.save)
         or a .safetensors file
  --tensor NAME   print that tensor's values and statistics (min, max, mean, std, NaN and inf counts); in a
                  training checkpoint NAME is a parameter name, model.<name> or optim.<name>.<state>
]]

-- An error for the user: raised as a table so that main() prints the message without a position or traceback.
local function fail(fmt, ...) error({msg = fmt:format(...)}, 0) end

local bytes_str = ST.bytes_str
local with_commas = require("fsdp.nn.module").with_commas

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function dir_list(path)
  local raw = C.fl_dir_list(path)
  if raw == nil then fail("cannot list '%s': %s", path, core.last_error()) end
  local s = ffi.string(raw)
  C.fl_free(raw)
  local out = {}
  for name in s:gmatch("([^\n]+)\n") do out[#out + 1] = name end
  table.sort(out)
  return out
end

local function read_json(path)
  local f, err = io.open(path, "rb")
  if not f then fail("cannot read '%s': %s", path, tostring(err)) end
  local s = f:read("*a")
  f:close()
  local ok, doc = pcall(cjson.decode, s)
  if not ok then fail("'%s' is not valid JSON: %s", path, tostring(doc)) end
  if type(doc) ~= "table" then fail("'%s' is not a JSON object", path) end
  return doc
end

-- The safetensors reader's header, its error (which names the file and the fault) as ours.
local function header(path, what)
  local ok, h = pcall(st.header, path)
  if not ok then
    local msg = tostring(h):gsub("^[^%s:]+%.lua:%d+: ", "")
    fail("%s%s", what and (what .. ": ") or "", msg)
  end
  return h
end

local function shape_str(s) return "[" .. table.concat(s, ", ") .. "]" end

-- Natural order: layers.2 before layers.10.
local function natural_less(a, b)
  local function parts(s)
    local out = {}
    for text, num in s:gmatch("(%D*)(%d*)") do
      if text ~= "" then out[#out + 1] = text end
      if num ~= "" then out[#out + 1] = tonumber(num) end
    end
    return out
  end
  local pa, pb = parts(a), parts(b)
  for i = 1, math.max(#pa, #pb) do
    local x, y = pa[i], pb[i]
    if x == nil then return true elseif y == nil then return false end
    if type(x) ~= type(y) then return type(x) == "number" end
    if x ~= y then return x < y end
  end
  return false
end

-- Columns padded to their widest cell (the last one unpadded), two spaces apart.
local function columns(rows, indent)
  local w = {}
  for _, row in ipairs(rows) do for c, cell in ipairs(row) do w[c] = math.max(w[c] or 0, #cell) end end
  local out = {}
  for i, row in ipairs(rows) do
    local cells = {}
    for c, cell in ipairs(row) do cells[c] = c == #row and cell or (cell .. (" "):rep(w[c] - #cell)) end
    out[i] = (indent or "") .. table.concat(cells, "  "):gsub("%s+$", "")
  end
  return out
end

-- "0-3,5,7-9" from a sorted list of integers.
local function ranges_str(list)
  local parts, i = {}, 1
  while i <= #list do
    local j = i
    while j < #list and list[j + 1] == list[j] + 1 do j = j + 1 end
    parts[#parts + 1] = i == j and tostring(list[i]) or (list[i] .. "-" .. list[j])
    i = j + 1
  end
  return table.concat(parts, ",")
end

-- Long tensor lists collapse the numbered segments (layers.{0-31}) of names whose other fields agree:
-- entries {name, cells = {...}} -> rows {display name, cells..., count}.
local GROUP_ABOVE = 40
local function grouped_rows(entries)
  if #entries <= GROUP_ABOVE then
    local rows = {}
    for i, e in ipairs(entries) do rows[i] = {e.name, unpack(e.cells)} end
    return rows, false
  end
  local groups, order = {}, {}
  for _, e in ipairs(entries) do
    local nums = {}
    local pattern = e.name:gsub("%.(%d+)%f[%.%z]", function(n) nums[#nums + 1] = tonumber(n); return ".#" end)
    local key = pattern .. "\0" .. table.concat(e.cells, "\0")
    local g = groups[key]
    if not g then
      g = {pattern = pattern, cells = e.cells, sets = {}, count = 0}
      groups[key] = g
      order[#order + 1] = g
    end
    g.count = g.count + 1
    for k, n in ipairs(nums) do
      g.sets[k] = g.sets[k] or {}
      g.sets[k][n] = true
    end
  end
  local rows = {}
  for _, g in ipairs(order) do
    local k = 0
    local name = g.pattern:gsub("%.#", function()
      k = k + 1
      local list = {}
      for n in pairs(g.sets[k]) do list[#list + 1] = n end
      table.sort(list)
      return #list == 1 and ("." .. list[1]) or (".{" .. ranges_str(list) .. "}")
    end)
    local row = {name, unpack(g.cells)}
    row[#row + 1] = g.count > 1 and ("x " .. g.count) or ""
    rows[#rows + 1] = row
  end
  return rows, true
end

-- ---- Hugging Face checkpoints and single files ----

-- The config keys worth a line, in this order, under their HF names (GPT-2's spelled its own way).
local CONFIG_KEYS = {"vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner", "num_hidden_layers",
                     "n_layer", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "n_positions", "num_local_experts", "num_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "sliding_window", "tie_word_embeddings"}

local function config_lines(cfg)
  local lines = {}
  local mt = type(cfg.model_type) == "string" and cfg.model_type or "(no model_type)"
  local arch = type(cfg.architectures) == "table" and table.concat(cfg.architectures, ", ") or nil
  local dt = cfg.dtype or cfg.torch_dtype
  lines[1] = ("  config: model_type %s%s%s"):format(mt, arch and (" (" .. arch .. ")") or "",
                                                  type(dt) == "string" and (", dtype " .. dt) or "")
  local kv = {}
  for _, k in ipairs(CONFIG_KEYS) do
    local v = cfg[k]
    if v ~= nil and v ~= cjson.null and type(v) ~= "table" then kv[#kv + 1] = k .. " " .. tostring(v) end
  end
  if #kv > 0 then lines[2] = "          " .. table.concat(kv, ", ") end
  return lines
end

-- Every tensor of the files: {name = {file =, hdr =, entry =}} and the list of names.
local function tensors_of(files)
  local index, names = {}, {}
  for _, f in ipairs(files) do
    for _, name in ipairs(f.hdr.names) do
      index[name] = {file = f.path, short = f.name, hdr = f.hdr, entry = f.hdr.tensors[name]}
      names[#names + 1] = name
    end
  end
  table.sort(names, natural_less)
  return index, names
end

local function tensor_table(index, names, with_file)
  local entries = {}
  local count, bytes, dtypes = 0, 0, {}
  for i, name in ipairs(names) do
    local e = index[name].entry
    entries[i] = {name = name, cells = {shape_str(e.shape), e.dtype, with_file and index[name].short or nil}}
    count, bytes = count + e.numel, bytes + e.nbytes
    dtypes[e.dtype] = (dtypes[e.dtype] or 0) + 1
  end
  local dl = {}
  for dt, n in pairs(dtypes) do dl[#dl + 1] = ("%s x %d"):format(dt, n) end
  table.sort(dl)
  local rows, grouped = grouped_rows(entries)
  local head = {"tensor", "shape", "dtype"}
  if with_file then head[#head + 1] = "file" end
  table.insert(rows, 1, head)
  local lines = {("  %d tensors, %s parameters, %s of tensor data (%s)"):format(#names, with_commas(count),
                 bytes_str(bytes), table.concat(dl, ", "))}
  if grouped then lines[#lines + 1] = "  (numbered names with equal shapes and dtypes grouped: x N is how many)" end
  lines[#lines + 1] = ""
  for _, l in ipairs(columns(rows, "  ")) do lines[#lines + 1] = l end
  return lines, count, bytes
end

-- An HF directory: its weight files (single or indexed), each header read and checked.
local function hf_files(dir)
  local single = dir .. "/model.safetensors"
  local index_path = dir .. "/model.safetensors.index.json"
  if exists(single) then
    return {{name = "model.safetensors", path = single, hdr = header(single)}}, nil
  end
  if not exists(index_path) then
    fail("'%s' has neither model.safetensors nor model.safetensors.index.json", dir)
  end
  local idx = read_json(index_path)
  if type(idx.weight_map) ~= "table" then fail("'%s' has no weight_map", index_path) end
  local by_file, order = {}, {}
  for name, file in pairs(idx.weight_map) do
    if type(file) ~= "string" then fail("'%s': weight_map maps '%s' to %s, not a file name", index_path, name, type(file)) end
    if not by_file[file] then by_file[file] = {}; order[#order + 1] = file end
    local t = by_file[file]
    t[#t + 1] = name
  end
  table.sort(order)
  local files = {}
  for _, file in ipairs(order) do
    local path = dir .. "/" .. file
    if not exists(path) then
      table.sort(by_file[file])
      fail("'%s' maps %d tensor(s) (%s%s) to '%s', which is missing", index_path, #by_file[file], by_file[file][1],
           #by_file[file] > 1 and ", ..." or "", file)
    end
    local hdr = header(path)
    for _, name in ipairs(by_file[file]) do
      if not hdr.tensors[name] then fail("the index maps '%s' to '%s', which does not hold it", name, file) end
    end
    files[#files + 1] = {name = file, path = path, hdr = hdr}
  end
  return files, idx
end

local function summary_hf(dir)
  local files, idx = hf_files(dir)
  local lines = {("Hugging Face checkpoint %s"):format(dir)}
  local cfg_path = dir .. "/config.json"
  if exists(cfg_path) then
    for _, l in ipairs(config_lines(read_json(cfg_path))) do lines[#lines + 1] = l end
  else
    lines[#lines + 1] = "  config: no config.json (weights only: from_pretrained needs it)"
  end
  local file_bytes = 0
  for _, f in ipairs(files) do file_bytes = file_bytes + f.hdr.file_size end
  if idx then
    lines[#lines + 1] = ("  weights: indexed, %d files (model.safetensors.index.json), %s on disk"):format(#files,
      bytes_str(file_bytes))
  else
    lines[#lines + 1] = ("  weights: single file model.safetensors, %s on disk"):format(bytes_str(file_bytes))
  end
  local index, names = tensors_of(files)
  local tl, _, bytes = tensor_table(index, names, idx ~= nil)
  if idx and type(idx.metadata) == "table" and type(idx.metadata.total_size) == "number"
     and idx.metadata.total_size ~= bytes then
    lines[#lines + 1] = ("  note: the index says total_size %d, the files hold %d bytes of tensor data"):format(
      idx.metadata.total_size, bytes)
  end
  for _, l in ipairs(tl) do lines[#lines + 1] = l end
  return lines, index, names
end

local function summary_file(path)
  local hdr = header(path)
  local lines = {("safetensors file %s, %s (header %d bytes)"):format(path, bytes_str(hdr.file_size), hdr.data_start - 8)}
  local meta = {}
  for k, v in pairs(hdr.metadata) do meta[#meta + 1] = k .. ": " .. v end
  table.sort(meta)
  if #meta > 0 then lines[#lines + 1] = "  metadata: " .. table.concat(meta, ", ") end
  local index, names = tensors_of({{name = path:match("[^/]+$"), path = path, hdr = hdr}})
  for _, l in ipairs((tensor_table(index, names, false))) do lines[#lines + 1] = l end
  return lines, index, names
end

-- ---- training checkpoints ----

local TRAIN_FORMAT, TRAIN_VERSION = "fsdp-lua training checkpoint", 1

local function rank_file(r, world) return ("rank-%05d-of-%05d.safetensors"):format(r, world) end

-- metadata.json and every rank file, checked as checkpoint.load checks them: each file's size and CRC32C against
-- metadata.json (when it lists them), the format and version, each tensor's pieces tiling it, each piece in its
-- rank's file with the dtype and element count metadata.json says. meta.verified: the files' checksums were checked.
local function train_checkpoint(dir)
  local mpath = dir .. "/metadata.json"
  local meta = read_json(mpath)
  if meta.format ~= TRAIN_FORMAT then
    fail("'%s' is not a training checkpoint's metadata (format %s)", mpath, tostring(meta.format))
  end
  if meta.version ~= TRAIN_VERSION then
    fail("'%s' has version %s; this build reads version %d", mpath, tostring(meta.version), TRAIN_VERSION)
  end
  local W = meta.world_size
  if type(W) ~= "number" or W < 1 or type(meta.tensors) ~= "table" then fail("'%s' lacks world_size or tensors", mpath) end
  local headers = {}
  local verified = 0
  for r = 0, W - 1 do
    local name = rank_file(r, W)
    local path = dir .. "/" .. name
    if not exists(path) then fail("the file of rank %d, '%s', is missing", r, path) end
    local bad = train.verify_file(dir, meta, r)   -- first: a flipped byte in a header is a checksum failure
    if bad then fail("%s", bad) end
    if bad == nil then verified = verified + 1 end
    headers[r] = header(path, ("the file of rank %d is damaged"):format(r))
  end
  meta.verified = verified
  for tname, rec in pairs(meta.tensors) do
    if type(rec) ~= "table" or type(rec.shape) ~= "table" or type(rec.pieces) ~= "table" then
      fail("'%s': tensor '%s' has no shape or pieces", mpath, tname)
    end
    local numel = 1
    for _, d in ipairs(rec.shape) do numel = numel * d end
    local pieces = {}
    for i, p in ipairs(rec.pieces) do
      if type(p) ~= "table" or type(p.rank) ~= "number" or type(p.start) ~= "number" or type(p.count) ~= "number"
         or p.rank < 0 or p.rank >= W then
        fail("'%s': tensor '%s': piece %d is malformed", mpath, tname, i)
      end
      pieces[i] = p
      local e = headers[p.rank].tensors[tname]
      local path = dir .. "/" .. rank_file(p.rank, W)
      if not e then fail("'%s' (rank %d) has no tensor '%s', which metadata.json places there", path, p.rank, tname) end
      if st.dtype_from_st[e.dtype] ~= rec.dtype or e.numel ~= p.count then
        fail("'%s' (rank %d): tensor '%s' is %s with %d elements, metadata.json says %s with %d", path, p.rank, tname,
             e.dtype, e.numel, tostring(rec.dtype), p.count)
      end
    end
    table.sort(pieces, function(a, b) return a.start < b.start end)
    local at = 0
    for _, p in ipairs(pieces) do
      if p.start ~= at then
        fail("'%s': tensor '%s': its pieces leave elements [%d, %d) uncovered or overlapping", mpath, tname,
             math.min(at, p.start), math.max(at, p.start))
      end
      at = p.start + p.count
    end
    if at ~= numel then fail("'%s': tensor '%s' has %d elements, its pieces cover %d", mpath, tname, numel, at) end
    rec.sorted = pieces
  end
  return meta, headers
end

local function value_str(v)
  if type(v) == "table" then
    if #v > 0 then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = value_str(x) end
      return "{" .. table.concat(parts, ", ") .. "}"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys)
    local parts = {}
    for i, k in ipairs(keys) do parts[i] = k .. " = " .. value_str(v[k]) end
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  if v == cjson.null then return "null" end
  if type(v) == "string" then return '"' .. v:gsub("\n", "\\n"):gsub('"', '\\"') .. '"' end
  return tostring(v)
end

-- One line, at most 160 characters of it.
local function clip(s) return #s > 160 and (s:sub(1, 157) .. "...") or s end

local function summary_train(dir)
  local meta, headers = train_checkpoint(dir)
  local W = meta.world_size
  local model = type(meta.model) == "table" and meta.model or {}
  local lines = {("training checkpoint %s (%s, version %d)"):format(dir, meta.format, meta.version)}
  lines[#lines + 1] = ("  step %s, world size %d, mode %s; model %s, %s parameter tensors"):format(
    meta.step ~= nil and tostring(meta.step) or "(none)", W, tostring(meta.mode), tostring(model.model_type or "?"),
    tostring(model.parameters or "?"))
  if type(meta.mesh) == "table" and type(meta.mesh.names) == "table" then
    local dims = {}
    for i, n in ipairs(meta.mesh.names) do dims[i] = ("%s = %s"):format(n, tostring((meta.mesh.sizes or {})[i])) end
    lines[#lines + 1] = "  mesh: " .. table.concat(dims, ", ")
  else
    lines[#lines + 1] = "  mesh: none (the world)"
  end
  local plan = type(meta.plan) == "table" and meta.plan or {}
  if type(plan.units) == "table" then
    local us = {}
    for i, u in ipairs(plan.units) do
      us[i] = ("%s (%d param%s)"):format(tostring(u.name), #(u.params or {}), #(u.params or {}) == 1 and "" or "s")
    end
    lines[#lines + 1] = ("  plan: %d FSDP units, sharded over %s ranks: %s"):format(#plan.units,
      tostring(plan.units[1] and plan.units[1].shard_size or "?"), table.concat(us, ", "))
  elseif type(plan.ddp) == "table" then
    lines[#lines + 1] = ("  plan: DDP over %s ranks"):format(tostring(plan.ddp.group_size))
  end
  local opt = meta.optimizer
  local state_of = {}
  if type(opt) == "table" then
    local n, with = 0, 0
    local kinds, steps = {}, {}
    for name, s in pairs(type(opt.state) == "table" and opt.state or {}) do
      with = with + 1
      state_of[name] = s
      for _, t in ipairs(s.tensors or {}) do kinds[t] = true end
      steps[tostring(s.step)] = true
    end
    for tname in pairs(meta.tensors) do if tname:sub(1, 6) == "model." then n = n + 1 end end
    local kl, sl = {}, {}
    for k in pairs(kinds) do kl[#kl + 1] = k end
    for s in pairs(steps) do sl[#sl + 1] = s end
    table.sort(kl); table.sort(sl)
    lines[#lines + 1] = ("  optimizer: %s, state %s for %d of %d parameters (step %s); %d param group%s"):format(
      tostring(opt.type), #kl > 0 and table.concat(kl, " + ") or "(none)", with, n, table.concat(sl, ", "),
      #(opt.param_groups or {}), #(opt.param_groups or {}) == 1 and "" or "s")
    for i, g in ipairs(opt.param_groups or {}) do
      lines[#lines + 1] = ("    group %d (%d params): %s"):format(i, #(g.params or {}), value_str(g.hyper or {}))
    end
  else
    lines[#lines + 1] = "  optimizer: none saved"
  end
  if meta.schedule ~= nil then lines[#lines + 1] = clip("  schedule: " .. value_str(meta.schedule)) end
  if type(meta.loader) == "table" then lines[#lines + 1] = clip("  loader: " .. value_str(meta.loader)) end
  if type(meta.rng) == "table" then
    lines[#lines + 1] = ("  rng: seed %s, dropout key counters %s"):format(tostring(meta.rng.seed),
      value_str(meta.rng.dropout_counter or {}))
  end
  if meta.extra ~= nil then lines[#lines + 1] = clip("  extra: " .. value_str(meta.extra)) end
  if meta.verified == W then
    lines[#lines + 1] = ("  files: %d, each matching the size and CRC32C in metadata.json"):format(W)
  else   -- verify_file checks all of them or none
    lines[#lines + 1] = "  files: not verified (metadata.json lists no checksums: saved by an older version)"
  end
  local frows = {}
  for r = 0, W - 1 do
    local h = headers[r]
    local e = type(meta.files) == "table" and meta.files[r + 1]
    frows[#frows + 1] = {rank_file(r, W), ("%d tensors"):format(#h.names), bytes_str(h.file_size),
                         type(e) == "table" and ("crc32c %s"):format(e.crc32c) or ""}
  end
  for _, l in ipairs(columns(frows, "    ")) do lines[#lines + 1] = l end
  -- one line per parameter: its global shape, dtype, every rank's rows and the optimizer state saved with it
  local names = {}
  for tname in pairs(meta.tensors) do if tname:sub(1, 6) == "model." then names[#names + 1] = tname:sub(7) end end
  table.sort(names, natural_less)
  local entries = {}
  for i, name in ipairs(names) do
    local rec = meta.tensors["model." .. name]
    local row0 = {}
    for _, p in ipairs(rec.sorted) do
      row0[p.rank] = p.row0 and ("[%d, %d)"):format(p.row0, p.row0 + p.rows) or ("elements [%d, %d)"):format(p.start,
                     p.start + p.count)
    end
    local cells = {shape_str(rec.shape), tostring(rec.dtype)}
    for r = 0, W - 1 do cells[#cells + 1] = row0[r] or "-" end
    local s = state_of[name]
    cells[#cells + 1] = s and table.concat(s.tensors or {}, ", ") or ""
    entries[i] = {name = name, cells = cells}
  end
  local rows, grouped = grouped_rows(entries)
  local head = {"parameter", "shape", "dtype"}
  for r = 0, W - 1 do head[#head + 1] = "rank " .. r .. " rows" end
  head[#head + 1] = "optimizer state"
  table.insert(rows, 1, head)
  lines[#lines + 1] = ("  %d tensors in metadata.json: %d parameters%s"):format((function()
    local n = 0
    for _ in pairs(meta.tensors) do n = n + 1 end
    return n
  end)(), #names, type(opt) == "table" and ", the rest optimizer state (optim.<name>.<state>, same rows)" or "")
  if grouped then lines[#lines + 1] = "  (numbered names with equal rows grouped: x N is how many)" end
  lines[#lines + 1] = ""
  for _, l in ipairs(columns(rows, "  ")) do lines[#lines + 1] = l end
  return lines, meta
end

-- ---- --tensor ----

-- min, max, mean, std (unbiased, as torch.std) over the finite values; NaN and inf counted apart.
local function stats_lines(t)
  local n = t:numel()
  local f = t.dtype == "f64" and t:contiguous() or t:to("f64")
  local p = n > 0 and f:data_ptr("double *") or nil
  local cnt, nan, pinf, ninf, sum = 0, 0, 0, 0, 0
  local lo, hi = math.huge, -math.huge
  for i = 0, n - 1 do
    local v = p[i]
    if v ~= v then nan = nan + 1
    elseif v == math.huge then pinf = pinf + 1
    elseif v == -math.huge then ninf = ninf + 1
    else
      cnt, sum = cnt + 1, sum + v
      if v < lo then lo = v end
      if v > hi then hi = v end
    end
  end
  local mean = cnt > 0 and sum / cnt or 0 / 0
  local ss = 0
  for i = 0, n - 1 do
    local v = p[i]
    if v == v and v ~= math.huge and v ~= -math.huge then ss = ss + (v - mean) ^ 2 end
  end
  local std = cnt > 1 and math.sqrt(ss / (cnt - 1)) or 0 / 0
  local function g(v) return ("%.8g"):format(v) end
  return {("  min %s  max %s  mean %s  std %s  (over the %s finite values; std unbiased, as torch.std)"):format(
            cnt > 0 and g(lo) or "nan", cnt > 0 and g(hi) or "nan", g(mean), g(std), with_commas(cnt)),
          ("  nan %d  +inf %d  -inf %d"):format(nan, pinf, ninf)}
end

-- Names that contain `name`, else those ending in the same last two dotted segments (mlp.up_proj.weight).
local function similar(name, names)
  local out = {}
  for _, n in ipairs(names) do
    if #out < 5 and n:find(name, 1, true) then out[#out + 1] = n end
  end
  local tail = name:match("([^.]+%.[^.]+)$")
  if #out == 0 and tail then
    for _, n in ipairs(names) do
      if #out < 5 and n:sub(-#tail - 1) == "." .. tail then out[#out + 1] = n end
    end
  end
  return out
end

local function no_tensor(path, name, names)
  local sim = similar(name, names)
  fail("'%s' has no tensor '%s' (%d tensors%s)", path, name, #names,
       #sim > 0 and ("; similar: " .. table.concat(sim, ", ")) or "; run without --tensor to list them")
end

local function read_file_tensor(index, names, path, name)
  local src = index[name]
  if not src then no_tensor(path, name, names) end
  local e = src.entry
  local fl = st.dtype_from_st[e.dtype]
  if not fl then
    fail("'%s': tensor '%s' has dtype %s, which the engine cannot read (BF16, BOOL, F16, F32, F64, I32, I64, U8)",
         src.file, name, e.dtype)
  end
  local t = Tensor.empty(e.shape, {dtype = fl})
  local ok, err = pcall(st.read_into, src.file, src.hdr, name, t)
  if not ok then fail("%s", tostring(err):gsub("^[^%s:]+%.lua:%d+: ", "")) end
  return t, ("%s, %s %s"):format(src.short or src.file, e.dtype, shape_str(e.shape))
end

local function read_train_tensor(dir, meta, name)
  local tname = name
  if not meta.tensors[tname] and meta.tensors["model." .. name] then tname = "model." .. name end
  local rec = meta.tensors[tname]
  if not rec then
    local names = {}
    for n in pairs(meta.tensors) do names[#names + 1] = n end
    table.sort(names, natural_less)
    no_tensor(dir, name, names)
  end
  if not core.dtypes[rec.dtype] then fail("'%s': tensor '%s' has dtype %s", dir, tname, tostring(rec.dtype)) end
  local t = Tensor.empty(rec.shape, {dtype = rec.dtype})
  local numel = t:numel()
  local flat = numel > 0 and t:view({numel}) or nil
  local held = {}
  for _, p in ipairs(rec.sorted) do
    local path = dir .. "/" .. rank_file(p.rank, meta.world_size)
    local hdr = header(path)
    local part = flat:narrow(1, p.start + 1, p.count)
    local ok, err = pcall(st.read_range_into, path, hdr, tname, part, 0)
    if not ok then fail("%s", tostring(err):gsub("^[^%s:]+%.lua:%d+: ", "")) end
    part:free()
    held[#held + 1] = p.row0 and ("rank %d rows [%d, %d)"):format(p.rank, p.row0, p.row0 + p.rows)
                      or ("rank %d elements [%d, %d)"):format(p.rank, p.start, p.start + p.count)
  end
  if flat then flat:free() end
  return t, ("%s %s, assembled from %s"):format(rec.dtype, shape_str(rec.shape), table.concat(held, ", ")), tname
end

-- ---- entry ----

local function inspect(path, tensor_name)
  local d = C.fl_is_dir(path)
  local lines, read
  if d == 1 then
    if exists(path .. "/metadata.json") then
      local meta
      lines, meta = summary_train(path)
      read = function(name) return read_train_tensor(path, meta, name) end
    elseif exists(path .. "/model.safetensors") or exists(path .. "/model.safetensors.index.json") then
      local index, names
      lines, index, names = summary_hf(path)
      read = function(name) return read_file_tensor(index, names, path, name) end
    else
      local ranks = {}
      for _, n in ipairs(dir_list(path)) do if n:match("^rank%-%d+%-of%-%d+%.safetensors$") then ranks[#ranks + 1] = n end end
      if #ranks > 0 then
        fail("'%s' holds %s but no metadata.json: not a complete training checkpoint (metadata.json is written "
             .. "last; was the save interrupted?)", path, table.concat(ranks, ", "))
      end
      fail("'%s' is neither a Hugging Face checkpoint (config.json + model.safetensors or "
           .. "model.safetensors.index.json) nor a training checkpoint (metadata.json)", path)
    end
  elseif not exists(path) then
    fail("'%s' does not exist", path)
  else
    local index, names
    lines, index, names = summary_file(path)
    read = function(name) return read_file_tensor(index, names, path, name) end
  end
  if not tensor_name then return table.concat(lines, "\n") .. "\n" end
  local t, where, shown = read(tensor_name)
  local out = {("%s (%s)"):format(shown or tensor_name, where), tostring(t)}
  for _, l in ipairs(stats_lines(t)) do out[#out + 1] = l end
  return table.concat(out, "\n") .. "\n"
end

M.inspect = inspect

-- main(arg1, ...) -> exit status: 0 printed, 1 the checkpoint is malformed (the message on stderr), 2 usage.
function M.main(...)
  local args = {...}
  local path, tensor
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "-h" or a == "--help" then io.stdout:write(USAGE) return 0
    elseif a == "--tensor" then
      tensor = args[i + 1]
      if not tensor then io.stderr:write("fsdp-lua inspect: --tensor needs a name\n", USAGE) return 2 end
      i = i + 1
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      io.stderr:write(("fsdp-lua inspect: unknown option '%s'\n"):format(a), USAGE) return 2
    elseif path then
      io.stderr:write(("fsdp-lua inspect: one PATH expected, got '%s' and '%s'\n"):format(path, a), USAGE) return 2
    else
      path = a
    end
    i = i + 1
  end
  if not path then io.stderr:write(USAGE) return 2 end
  path = path:gsub("/+$", "")
  if path == "" then path = "/" end
  local ok, res = pcall(inspect, path, tensor)
  if ok then
    io.stdout:write(res)
    return 0
  end
  local msg = type(res) == "table" and res.msg or tostring(res):gsub("^[^%s:]+%.lua:%d+: ", "")
  io.stderr:write("fsdp-lua inspect: ", msg, "\n")
  return 1
end

return M
