-- lua/fsdp/safetensors.lua: safetensors files (hf-models.md §10). The JSON header is parsed and validated here
-- with lua-cjson; the tensor bytes are read and written by the engine (engine/io/safetensors.c) at byte offsets, with
-- dtype conversion. Sharded checkpoints and FSDP shards build on header() + read_into() + write_at().
local ffi    = require "ffi"
local cjson  = require "cjson"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"

local C = core.C
local M = {}

-- safetensors dtype string -> engine dtype name (nil: valid in the format, unsupported by the engine).
local ST_TO_FL = {F32 = "f32", F64 = "f64", BF16 = "bf16", F16 = "f16", I32 = "i32", I64 = "i64", U8 = "u8", BOOL = "bool"}
local FL_TO_ST = {}
for st, fl in pairs(ST_TO_FL) do FL_TO_ST[fl] = st end
-- Element sizes of every dtype the format defines, so a header with e.g. I8 tensors still validates.
local ST_SIZE = {BOOL = 1, U8 = 1, I8 = 1, F8_E4M3 = 1, F8_E5M2 = 1, F8_E8M0 = 1, I16 = 2, U16 = 2, F16 = 2, BF16 = 2,
                 I32 = 4, U32 = 4, F32 = 4, F64 = 8, I64 = 8, U64 = 8}
M.dtype_from_st = ST_TO_FL
M.dtype_to_st = FL_TO_ST

local len_buf = ffi.new("int64_t[1]")

local function is_int(v) return type(v) == "number" and v >= 0 and v == math.floor(v) and v < 2^53 end

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

-- The top-level keys of a JSON object text, in order (decoded), or nil when the text is not an object: cjson keeps
-- the last of duplicate keys silently, so duplicates are found here.
local function top_level_keys(text)
  local i, n, keys = 1, #text, {}
  local function ws() i = text:find("[^ \t\r\n]", i) or n + 1 end
  local function str()   -- at a '"': returns the literal, leaves i after it
    local j = i + 1
    while j <= n do
      local c = text:sub(j, j)
      if c == "\\" then j = j + 2 elseif c == '"' then break else j = j + 1 end
    end
    local lit = text:sub(i, j)
    i = j + 1
    return lit
  end
  local function value()   -- skips one value of any kind
    ws()
    local c = text:sub(i, i)
    if c == '"' then str(); return end
    if c == "{" or c == "[" then
      local depth = 0
      repeat
        c = text:sub(i, i)
        if c == '"' then str()
        else
          if c == "{" or c == "[" then depth = depth + 1 elseif c == "}" or c == "]" then depth = depth - 1 end
          i = i + 1
        end
      until depth == 0 or i > n
      return
    end
    i = (text:find("[,}%]]", i) or n + 1)
  end
  ws()
  if text:sub(i, i) ~= "{" then return nil end
  i = i + 1
  ws()
  if text:sub(i, i) == "}" then return keys end
  while i <= n do
    ws()
    if text:sub(i, i) ~= '"' then return nil end
    local ok, k = pcall(cjson.decode, str())
    if not ok then return nil end
    keys[#keys + 1] = k
    ws()
    if text:sub(i, i) ~= ":" then return nil end
    i = i + 1
    value()
    ws()
    local c = text:sub(i, i)
    i = i + 1
    if c == "}" then return keys end
    if c ~= "," then return nil end
  end
  return nil
end

-- Valid UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), as the format requires of the header.
local function utf8_ok(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, lo, min
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len, lo, min = 2, c % 0x20, 0x80
    elseif c >= 0xE0 and c <= 0xEF then len, lo, min = 3, c % 0x10, 0x800
    elseif c >= 0xF0 and c <= 0xF4 then len, lo, min = 4, c % 0x08, 0x10000
    else return false end
    if len > 1 then
      local cp = lo
      for k = 1, len - 1 do
        local b = s:byte(i + k)
        if not b or b < 0x80 or b > 0xBF then return false end
        cp = cp * 64 + (b - 0x80)
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
    end
    i = i + len
  end
  return true
end

-- Parses and validates the header of `path` as strictly as the reference implementation: UTF-8 JSON object,
-- no duplicate names, {dtype, shape, data_offsets} entries plus an optional string->string __metadata__, byte
-- lengths equal to shape x dtype size, data contiguous from offset 0 with no holes or overlaps, ending exactly
-- at the end of the file. Returns
--   {tensors = {name = {dtype = "F32", shape = {..}, data_offsets = {b, e}, offset = absolute byte offset,
--                       nbytes = e - b, numel = n}},
--    names = {...} (sorted by data offset), metadata = {k = v} (strings), data_start = 8 + N, file_size = bytes}
function M.header(path)
  if type(path) ~= "string" then error(("safetensors.header: path must be a string, got %s"):format(type(path)), 2) end
  local raw = C.fl_st_read_header(path, len_buf)
  if raw == nil then error(core.last_error(), 2) end
  local hlen = tonumber(len_buf[0])
  local text = ffi.string(raw, hlen)
  C.fl_free(raw)
  if not utf8_ok(text) then error(("safetensors: '%s': the header is not valid UTF-8"):format(path), 2) end
  local ok, doc = pcall(cjson.decode, text)
  if not ok then
    error(("safetensors: '%s' has a malformed JSON header (%d bytes): %s"):format(path, hlen, tostring(doc)), 2)
  end
  if type(doc) ~= "table" then
    error(("safetensors: '%s': the header is not a JSON object"):format(path), 2)
  end
  local seen = {}
  for _, k in ipairs(top_level_keys(text) or {}) do
    if seen[k] then error(("safetensors: '%s': tensor '%s' appears twice in the header"):format(path, k), 2) end
    seen[k] = true
  end
  local fsize = file_size(path)
  local data_start = 8 + hlen
  local data_len = fsize - data_start
  local hdr = {tensors = {}, names = {}, metadata = {}, data_start = data_start, file_size = fsize}
  local function bad(name, msg, ...)
    core.raise(("safetensors: '%s': tensor '%s': " .. msg):format(path, name, ...))
  end
  for name, e in pairs(doc) do
    if name == "__metadata__" then
      if type(e) ~= "table" then error(("safetensors: '%s': __metadata__ must be an object"):format(path), 2) end
      for k, v in pairs(e) do
        if type(v) ~= "string" then
          error(("safetensors: '%s': __metadata__ value of '%s' must be a string, got %s"):format(path, tostring(k), type(v)), 2)
        end
        hdr.metadata[k] = v
      end
    else
      if type(e) ~= "table" then bad(name, "entry is not an object") end
      local dt, shape, offs = e.dtype, e.shape, e.data_offsets
      if type(dt) ~= "string" or not ST_SIZE[dt] then bad(name, "unknown dtype '%s'", tostring(dt)) end
      if type(shape) ~= "table" then bad(name, "shape is missing or not a list") end
      local numel = 1
      for i = 1, #shape do
        if not is_int(shape[i]) then bad(name, "shape entry %d is %s, expected a non-negative integer", i, tostring(shape[i])) end
        numel = numel * shape[i]
      end
      if #shape > 8 then bad(name, "%d dimensions (the engine supports at most 8)", #shape) end
      if numel * ST_SIZE[dt] >= 2 ^ 53 then bad(name, "shape [%s] is too large (byte length overflows)", table.concat(shape, ", ")) end
      if type(offs) ~= "table" or #offs ~= 2 or not is_int(offs[1]) or not is_int(offs[2]) or offs[2] < offs[1] then
        bad(name, "data_offsets must be two non-negative integers [begin, end] with begin <= end")
      end
      local nbytes = offs[2] - offs[1]
      if nbytes ~= numel * ST_SIZE[dt] then
        bad(name, "data_offsets [%d, %d] hold %d bytes but shape [%s] of %s needs %d", offs[1], offs[2], nbytes,
            table.concat(shape, ", "), dt, numel * ST_SIZE[dt])
      end
      if offs[2] > data_len then
        bad(name, "data_offsets [%d, %d] run past the end of the data (%d bytes: the file is truncated)", offs[1], offs[2], data_len)
      end
      local s = {}
      for i = 1, #shape do s[i] = shape[i] end
      hdr.tensors[name] = {dtype = dt, shape = s, data_offsets = {offs[1], offs[2]}, offset = data_start + offs[1],
                           nbytes = nbytes, numel = numel}
      hdr.names[#hdr.names + 1] = name
    end
  end
  local t = hdr.tensors
  table.sort(hdr.names, function(a, b)
    local oa, ob = t[a].data_offsets, t[b].data_offsets
    if oa[1] ~= ob[1] then return oa[1] < ob[1] end
    if oa[2] ~= ob[2] then return oa[2] < ob[2] end
    return a < b
  end)
  -- Sorted by offsets, the data is contiguous: each tensor begins where the previous one ended (empty tensors
  -- included), the first at 0, and the last ends at the end of the file.
  local at, prev = 0, nil
  for _, name in ipairs(hdr.names) do
    local o = t[name].data_offsets
    if o[1] < at then
      error(("safetensors: '%s': tensors '%s' [%d, %d) and '%s' [%d, %d) overlap"):format(path, prev,
            t[prev].data_offsets[1], t[prev].data_offsets[2], name, o[1], o[2]), 2)
    elseif o[1] > at then
      error(("safetensors: '%s': tensor '%s' begins at byte %d of the data, leaving a hole after byte %d"):format(
            path, name, o[1], at), 2)
    end
    at, prev = o[2], name
  end
  if at ~= data_len then
    error(("safetensors: '%s': the tensors end at byte %d of the data but the file holds %d bytes of data"):format(
          path, at, data_len), 2)
  end
  return hdr
end

local function engine_dtype(path, name, st)
  local fl = ST_TO_FL[st]
  if not fl then
    core.raise(("safetensors: '%s': tensor '%s' has dtype %s, which the engine does not support "
           .. "(supported: BF16, BOOL, F16, F32, F64, I32, I64, U8)"):format(path, name, st))
  end
  return fl
end

-- Reads tensor `name` (an entry of header(path)) into `t` (contiguous, allocated, same number of elements),
-- converting the file's dtype to t's.
-- Reads elements [elem_offset, elem_offset + t:numel()) of tensor `name` (in row-major order) into `t`,
-- converting dtypes: a dim-0 shard is one such range, so each rank reads only its own rows.
function M.read_range_into(path, hdr, name, t, elem_offset)
  local e = hdr.tensors[name]
  if not e then core.raise(("safetensors: '%s' has no tensor '%s'"):format(path, name)) end
  local fl = engine_dtype(path, name, e.dtype)
  local n = t:numel()
  if elem_offset < 0 or elem_offset + n > e.numel then
    core.raise(("safetensors: '%s': tensor '%s' has %d elements; elements [%d, %d) are out of range")
               :format(path, name, e.numel, elem_offset, elem_offset + n))
  end
  if n == 0 then return t end
  local rc = C.fl_st_read_into(path, e.offset + elem_offset * ST_SIZE[e.dtype], core.dtypes[fl],
                               Tensor.ptr(t, "safetensors.read_range_into", 4))
  if rc < 0 then core.raise(("safetensors: tensor '%s': %s"):format(name, core.last_error())) end
  return t
end

function M.read_into(path, hdr, name, t)
  local e = hdr.tensors[name]
  if not e then error(("safetensors: '%s' has no tensor '%s'"):format(path, name), 2) end
  local fl = engine_dtype(path, name, e.dtype)
  if t:numel() ~= e.numel then
    error(("safetensors: '%s': tensor '%s' has shape [%s] (%d elements), the destination is %s (%d)")
          :format(path, name, table.concat(e.shape, ", "), e.numel, t:shape_str(), t:numel()), 2)
  end
  local rc = C.fl_st_read_into(path, e.offset, core.dtypes[fl], Tensor.ptr(t, "safetensors.read_into", 4))
  if rc < 0 then error(("safetensors: tensor '%s': %s"):format(name, core.last_error()), 2) end
  return t
end

local LOAD_OPTS = {names = true, dtype = true}

-- load(path, {names = {...}, dtype = "f32"}) -> {name = Tensor}, metadata. Without names, every tensor; without
-- dtype, each tensor keeps the file's dtype.
function M.load(path, opts)
  opts = core.check_opts("safetensors.load", opts, LOAD_OPTS, 2)
  local want_dt = opts.dtype and core.dtype_id(opts.dtype, "safetensors.load")
  local hdr = M.header(path)
  local names = opts.names
  if names ~= nil then
    if type(names) ~= "table" then error(("safetensors.load: names must be a list, got %s"):format(type(names)), 2) end
    for _, n in ipairs(names) do
      if not hdr.tensors[n] then error(("safetensors: '%s' has no tensor '%s'"):format(path, tostring(n)), 2) end
    end
  else
    names = hdr.names
  end
  local out = {}
  for _, name in ipairs(names) do
    local e = hdr.tensors[name]
    local fl = engine_dtype(path, name, e.dtype)
    local t = Tensor.empty(e.shape, {dtype = want_dt and core.dtype_names[want_dt] or fl})
    local rc = C.fl_st_read_into(path, e.offset, core.dtypes[fl], t._p)
    if rc < 0 then error(("safetensors: tensor '%s': %s"):format(name, core.last_error()), 2) end
    out[name] = t
  end
  return out, hdr.metadata
end

local function le_u64(n)
  local b = {}
  for i = 1, 8 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
  return table.concat(b)
end

-- The header text for `layout` (list of {name, st_dtype, shape, begin, end}) padded with spaces so that the
-- data starts 8-byte aligned; keys in sorted order, __metadata__ first, as a stable byte-for-byte output.
local function header_text(layout, metadata)
  local parts = {}
  if metadata and next(metadata) then
    local keys = {}
    for k in pairs(metadata) do keys[#keys + 1] = k end
    table.sort(keys)
    local kv = {}
    for i, k in ipairs(keys) do kv[i] = cjson.encode(k) .. ":" .. cjson.encode(metadata[k]) end
    parts[#parts + 1] = '"__metadata__":{' .. table.concat(kv, ",") .. "}"
  end
  local sorted = {}
  for i = 1, #layout do sorted[i] = layout[i] end
  table.sort(sorted, function(a, b) return a.name < b.name end)
  for _, l in ipairs(sorted) do
    local dims = {}
    for i, d in ipairs(l.shape) do dims[i] = ("%d"):format(d) end
    parts[#parts + 1] = ('%s:{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}'):format(
      cjson.encode(l.name), l.st, table.concat(dims, ","), l.b, l.e)
  end
  local s = "{" .. table.concat(parts, ",") .. "}"
  local pad = (8 - (8 + #s) % 8) % 8
  return s .. string.rep(" ", pad)
end

-- Plans the layout of a file: tensors ordered by element size (largest first) then name, as the reference
-- writer does. `specs` is a list of {name =, dtype = engine dtype name, shape =}. Returns the layout, the header
-- text and the data start; the bytes of tensor i go at data_start + layout[i].b (layout[i].spec is its spec).
function M.plan(specs, metadata)
  local order = {}
  for i = 1, #specs do order[i] = specs[i] end
  for _, s in ipairs(order) do
    if not FL_TO_ST[s.dtype] then core.raise(("safetensors: tensor '%s': cannot save dtype %s"):format(s.name, tostring(s.dtype))) end
  end
  table.sort(order, function(a, b)
    local sa, sb = ST_SIZE[FL_TO_ST[a.dtype]], ST_SIZE[FL_TO_ST[b.dtype]]
    if sa ~= sb then return sa > sb end
    return a.name < b.name
  end)
  local layout, off = {}, 0
  for i, s in ipairs(order) do
    local st = FL_TO_ST[s.dtype]
    local numel = 1
    for _, d in ipairs(s.shape) do numel = numel * d end
    local n = numel * ST_SIZE[st]
    layout[i] = {name = s.name, st = st, dtype = s.dtype, shape = s.shape, b = off, e = off + n, spec = s}
    off = off + n
  end
  local text = header_text(layout, metadata)
  return layout, text, 8 + #text, off
end

-- Writes the 8-byte length and the header at the start of `path`, truncating it.
function M.write_header(path, text)
  local f, err = io.open(path, "wb")
  if not f then error(("safetensors: cannot create '%s': %s"):format(path, tostring(err)), 2) end
  local ok, werr = f:write(le_u64(#text), text)
  f:close()
  if not ok then error(("safetensors: cannot write the header of '%s': %s"):format(path, tostring(werr)), 2) end
end

-- save(path, {name = Tensor}, metadata): a spec-conformant file written to a temporary name (core.tmp_name) and renamed into place,
-- so a crash never leaves a half-written file under the final name. Tensors keep their dtype.
function M.save(path, tensors, metadata)
  if type(path) ~= "string" then error(("safetensors.save: path must be a string, got %s"):format(type(path)), 2) end
  if type(tensors) ~= "table" then error(("safetensors.save: tensors must be a table name -> tensor, got %s"):format(type(tensors)), 2) end
  if metadata ~= nil then
    if type(metadata) ~= "table" then error("safetensors.save: metadata must be a table of strings", 2) end
    for k, v in pairs(metadata) do
      if type(k) ~= "string" or type(v) ~= "string" then
        error(("safetensors.save: metadata entries must be string -> string, got %s -> %s"):format(type(k), type(v)), 2)
      end
    end
  end
  local specs = {}
  for name, t in pairs(tensors) do
    if type(name) ~= "string" or name == "__metadata__" or name == "" then
      error(("safetensors.save: bad tensor name %s"):format(tostring(name)), 2)
    end
    if not Tensor.is_tensor(t) then error(("safetensors.save: '%s' is not a tensor (%s)"):format(name, type(t)), 2) end
    if not t:has_data() then error(("safetensors.save: tensor '%s' %s has no data (meta or released)"):format(name, t:shape_str()), 2) end
    local shard = Tensor.shard_info(t)
    if shard and shard.numel ~= t:numel() then
      -- an FSDP shard under a full parameter's name would be a silently wrong checkpoint
      core.raise(("safetensors.save: '%s' %s is this rank's FSDP shard (elements %d.. of %d), not the whole tensor: "
                  .. "save model:full_state_dict() (or save_pretrained, which gathers)"):format(
                  name, t:shape_str(), shard.offset, shard.numel))
    end
    specs[#specs + 1] = {name = name, dtype = t.dtype, shape = t:shape(), t = t}
  end
  local layout, text, data_start = M.plan(specs, metadata)
  local tmp = core.tmp_name(path)
  M.write_header(tmp, text)
  for _, l in ipairs(layout) do
    local t = tensors[l.name]
    if l.e > l.b then
      local rc = C.fl_st_write_at(tmp, data_start + l.b, core.dtypes[l.dtype], t._p)
      if rc < 0 then
        os.remove(tmp)
        error(("safetensors: tensor '%s': %s"):format(l.name, core.last_error()), 2)
      end
    end
  end
  local ok, err = os.rename(tmp, path)
  if not ok then error(("safetensors: cannot rename '%s' to '%s': %s"):format(tmp, path, tostring(err)), 2) end
end

return M
