-- lua/fsdp/generate.lua: model:generate(ids, opts) for every causal LM — greedy or sampled decoding with a key/value
-- cache, batched with left padding, as transformers' generate() does it.
--
-- The cache (M.Cache) is pre-allocated per attention module at its first use: k and v [B, prompt + max_new_tokens,
-- nKV, hd]; `valid` [B, L] marks the real (non-padding) positions. Positions follow transformers: a row's position
-- ids count its real tokens (attention_mask.cumsum(-1) - 1, padding at 1), so a left-padded row is the same as the
-- same prompt unpadded. Attention of the new queries runs over the cache (fl_attention_cached: causal, padding and
-- sliding-window masks in cache positions). The model's forward is the training forward with a `cache` option, so a
-- sharded model gathers each unit per step exactly as in training; every rank must call generate with the same
-- arguments (they then draw the same tokens). Decoding runs in eval mode under no_grad; the mode is restored.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local basic  = require "fsdp.ops.basic"
local ops    = require "fsdp.nn.ops"

local C = core.C
local M = {}

-- ---- the cache ----
local Cache = {}
Cache.__index = Cache
M.Cache = Cache

function Cache.new(B, capacity)
  local valid = Tensor.zeros({B, capacity}, {dtype = "u8"})
  return setmetatable({B = B, capacity = capacity, len = 0, T = 0, kv = {}, valid = valid, pos = nil}, Cache)
end

-- Positions of the next T tokens of every row (i64 [B, T]) and their validity; called before each forward.
function Cache:advance(pos, new_valid)
  local B, T = self.B, pos:size(2)
  if self.len + T > self.capacity then
    core.raise(("generate: %d cached + %d new tokens exceed the cache of %d"):format(self.len, T, self.capacity))
  end
  local pv, pn = ffi.cast("uint8_t *", self.valid:data_ptr()), ffi.cast("const uint8_t *", new_valid:data_ptr())
  for b = 0, B - 1 do
    for t = 0, T - 1 do pv[b * self.capacity + self.len + t] = pn[b * T + t] end
  end
  if self.pos then self.pos:free() end
  self.pos, self.T = pos, T
  local pp, m = ffi.cast("const int64_t *", pos:data_ptr()), -1
  for i = 0, B * T - 1 do if tonumber(pp[i]) > m then m = tonumber(pp[i]) end end
  self.max_pos = m
end

-- The largest position id of the tokens this forward adds (over all rows: transformers' seq_len - 1 for the
-- rope types that depend on it).
function Cache:max_position() return self.max_pos end

-- After the forward: the new tokens are cached.
function Cache:commit() self.len = self.len + self.T end

-- Row b's positions as an i64 [T] tensor (a view).
local function row_positions(pos, b)
  local r = basic.narrow(pos, 1, b + 1, 1)
  local v = basic.view(r, {pos:size(2)}); r:free()
  return v
end

-- RoPE of x [B, T, heads, hd] at each row's own positions: theta's frequencies, or the table inv_freq with the
-- attention scaling (scaled RoPE, one table for the batch as transformers').
function Cache:rope(x, theta, rot, inv_freq, scale)
  local function rotate(xb, p)
    if inv_freq then return ops.rope_freqs(xb, p, inv_freq, scale) end
    return ops.rope(xb, p, theta, rot)
  end
  if self.B == 1 then
    local p = row_positions(self.pos, 0)
    local out = rotate(x, p); p:free()
    return out
  end
  local rows = {}
  for b = 0, self.B - 1 do
    local xb = basic.narrow(x, 1, b + 1, 1)
    local p = row_positions(self.pos, b)
    rows[b + 1] = rotate(xb, p)
    xb:free(); p:free()
  end
  local out = basic.cat(rows, 1)
  for _, r in ipairs(rows) do r:free() end
  return out
end

-- Appends k, v [B, T, nKV, hd] to the module's cache and returns the attention of q [B, T, nH, hd] over it.
function Cache:attend(owner, q, k, v, scale, window)
  local slot = self.kv[owner]
  if not slot then
    local s = k:shape()
    local shape = {self.B, self.capacity, s[3], s[4]}
    slot = {k = Tensor.zeros(shape, {dtype = k.dtype}), v = Tensor.zeros(shape, {dtype = v.dtype})}
    self.kv[owner] = slot
  end
  local L, T = self.len, self.T
  for _, pair in ipairs {{slot.k, k}, {slot.v, v}} do
    local dst = basic.narrow(pair[1], 2, L + 1, T)
    basic.copy_(dst, pair[2]); dst:free()
  end
  local kc, vc = basic.narrow(slot.k, 2, 1, L + T), basic.narrow(slot.v, 2, 1, L + T)
  local out = Tensor.own(C.fl_attention_cached(q._p, kc._p, vc._p, scale, L, window or 0, self.valid._p),
                         "attention_cached")
  kc:free(); vc:free()
  return out
end

-- Forgets every cached token (the cache is then refilled from position 0).
function Cache:reset()
  for _, slot in pairs(self.kv) do slot.k:free(); slot.v:free() end
  self.kv = {}
  ffi.fill(ffi.cast("uint8_t *", self.valid:data_ptr()), self.B * self.capacity, 0)
  self.len = 0
end

function Cache:free()
  for _, slot in pairs(self.kv) do slot.k:free(); slot.v:free() end
  self.kv = {}
  self.valid:free()
  if self.pos then self.pos:free() end
end

-- ---- sampling ----

-- transformers' logits processors in its order: temperature, then top-k, then top-p (keeping at least one token);
-- returns the probabilities of row r of logits [B, V] as a Lua array (1-based ids + 1).
local function probabilities(lp, V, temperature, top_k, top_p)
  local x = {}
  for i = 1, V do x[i] = lp[i - 1] / temperature end
  local order = {}
  for i = 1, V do order[i] = i end
  table.sort(order, function(a, b) if x[a] ~= x[b] then return x[a] > x[b] end return a < b end)
  local keep = V
  if top_k and top_k > 0 and top_k < V then keep = top_k end
  local m = x[order[1]]
  local p, sum = {}, 0
  for r = 1, keep do local e = math.exp(x[order[r]] - m); p[r] = e; sum = sum + e end
  if top_p and top_p < 1 then
    -- the smallest top set whose probability reaches top_p (transformers removes tokens whose cumulative
    -- probability, counted from the least likely, is <= 1 - top_p)
    local cum, cut = 0, keep
    for r = 1, keep do
      cum = cum + p[r] / sum
      if cum >= top_p then cut = r; break end
    end
    keep = cut
    sum = 0
    for r = 1, keep do sum = sum + p[r] end
  end
  local out = {}
  for r = 1, keep do out[r] = {order[r] - 1, p[r] / sum} end
  return out
end

-- A uniform number in [0, 1) for (seed, step, row) from the counter-based RNG: the same on every rank.
local function uniform(seed, step, row)
  local u = Tensor.rand({1}, {dtype = "f64", seed = seed, name = ("generate.%d.%d"):format(step, row)})
  local v = u:get(0)
  u:free()
  return v
end

-- ---- generate ----
local OPTS = {max_new_tokens = true, temperature = true, top_k = true, top_p = true, eos_token_id = true,
              pad_token_id = true, seed = true, attention_mask = true, do_sample = true}

local function describe(v) return type(v) == "number" and tostring(v) or type(v) end
local function is_int(v) return type(v) == "number" and v == math.floor(v) and v > -math.huge and v < math.huge end

-- A tensor's values as a flat Lua array (row-major), read through a contiguous f64 copy: `to` and `contiguous`
-- return the tensor itself when it is already f64 or already contiguous, and a view's bytes are not row-major.
local function values_of(t)
  local t64 = basic.to(t, "f64")
  local c = basic.contiguous(t64)
  local p = ffi.cast("const double *", c:data_ptr())
  local r = {}
  for i = 0, t:numel() - 1 do r[i + 1] = p[i] end
  c:free(); t64:free()
  return r
end

local function check_tensor(name, t, B, T0)
  if not Tensor.is_tensor(t) then core.raise(("generate: %s must be a tensor, got %s"):format(name, type(t))) end
  if not t:has_data() then
    core.raise(("generate: %s %s has no data (%s)"):format(name, t:shape_str(),
               t.device == "meta" and "on meta" or "released storage"))
  end
  if B and (t:dim() ~= 2 or t:size(1) ~= B or t:size(2) ~= T0) then
    core.raise(("generate: %s must be [%d, %d] like ids, got %s"):format(name, B, T0, t:shape_str()))
  end
end

-- eos_token_id: one id or a list of them; ids the model cannot produce (the tiny test models keep GPT-2's 50256)
-- are allowed, and never end a row.
local function eos_set(v, from)
  if v == nil then return {}, {} end
  local list = type(v) == "table" and v or {v}
  local n = 0
  for _ in pairs(list) do n = n + 1 end
  if n ~= #list then core.raise(("generate: %s must be a token id or a list of them, got a table with keys"):format(from)) end
  local set = {}
  for _, x in ipairs(list) do
    if not is_int(x) or x < 0 then
      core.raise(("generate: %s must be a token id or a list of them, got %s"):format(from, describe(x)))
    end
    set[x] = true
  end
  return set, list
end

-- Every option checked, and the attention mask read, before any work: returns what decoding needs.
-- Sampling: do_sample = true samples, false is greedy; unset, a temperature > 0 samples and none (or 0) is greedy.
-- (transformers leaves do_sample to the generation config and only warns when a sampling option meets greedy
-- decoding; here such an option is an error, so nothing the caller passed is silently dropped.)
local function parse(model, ids, opts)
  opts = core.check_opts("generate", opts, OPTS, 3)
  if type(model) ~= "table" then core.raise(("generate: model must be a model, got %s"):format(type(model))) end
  local cfg = model.config or {}
  local V = cfg.vocab_size
  if not is_int(V) or V < 1 then core.raise(("generate: the model's config.vocab_size is %s"):format(describe(V))) end
  if not Tensor.is_tensor(ids) or ids:dim() ~= 2 or (ids.dtype ~= "i64" and ids.dtype ~= "i32") then
    core.raise(("generate: ids must be an i64 (or i32) tensor [B, T], got %s"):format(Tensor.is_tensor(ids)
               and (ids.dtype .. " " .. ids:shape_str()) or type(ids)))
  end
  check_tensor("ids", ids)
  local B, T0 = ids:size(1), ids:size(2)
  if B < 1 then core.raise("generate: the batch is empty (ids has no rows)") end
  if T0 < 1 then core.raise("generate: the prompt is empty (ids has no columns)") end
  local ids_v = values_of(ids)
  for k, x in ipairs(ids_v) do
    if x < 0 or x >= V then
      core.raise(("generate: ids[%d][%d] = %d is not a token id of the model (vocab_size %d)")
                 :format(math.floor((k - 1) / T0), (k - 1) % T0, x, V))
    end
  end

  local n = opts.max_new_tokens
  if n == nil then n = 20 end
  if not is_int(n) or n < 1 then   -- transformers: "`max_new_tokens` must be greater than 0"
    core.raise(("generate: max_new_tokens must be an integer >= 1, got %s"):format(describe(n)))
  end
  -- learned positions (GPT-2) end at n_positions; RoPE models run past max_position_embeddings, as transformers'
  local limit = cfg.n_positions
  if limit and T0 + n > limit then
    core.raise(("generate: %d prompt + %d new tokens exceed the model's %d positions"):format(T0, n, limit))
  end

  local sample, temperature, top_k, top_p = opts.do_sample, opts.temperature, opts.top_k, opts.top_p
  if sample ~= nil and type(sample) ~= "boolean" then
    core.raise(("generate: do_sample must be true or false, got %s"):format(describe(sample)))
  end
  if temperature ~= nil and not (type(temperature) == "number" and temperature >= 0 and temperature < math.huge) then
    core.raise(("generate: temperature must be a finite number >= 0 (0: greedy), got %s"):format(describe(temperature)))
  end
  if top_k ~= nil and not (is_int(top_k) and top_k >= 0) then
    core.raise(("generate: top_k must be an integer >= 0 (0: no top-k filter), got %s"):format(describe(top_k)))
  end
  if top_p ~= nil and not (type(top_p) == "number" and top_p > 0 and top_p <= 1) then
    core.raise(("generate: top_p must be a number in (0, 1], got %s"):format(describe(top_p)))
  end
  if sample == nil then sample = temperature ~= nil and temperature > 0 end
  if sample then
    if temperature == 0 then
      core.raise("generate: sampling needs a temperature > 0, got 0 (for greedy decoding leave do_sample unset or false)")
    end
  else
    -- neutral values (transformers' defaults, and 0 as this function's spelling of greedy) are fine
    local why = opts.do_sample == false and "do_sample = false" or "do_sample unset, no temperature > 0"
    if temperature ~= nil and temperature ~= 0 and temperature ~= 1 then
      core.raise(("generate: temperature = %s needs sampling, but decoding is greedy (%s)"):format(temperature, why))
    end
    if top_k ~= nil and top_k ~= 0 then
      core.raise(("generate: top_k = %d needs sampling (do_sample = true or a temperature > 0); decoding is greedy (%s)")
                 :format(top_k, why))
    end
    if top_p ~= nil and top_p ~= 1 then
      core.raise(("generate: top_p = %s needs sampling (do_sample = true or a temperature > 0); decoding is greedy (%s)")
                 :format(top_p, why))
    end
  end
  -- the seed keys the counter-based RNG (a uint64); only draws depend on it, so greedy decoding accepts one
  local seed = opts.seed
  if seed == nil then seed = 0 end
  if not is_int(seed) or seed < 0 or seed > 2 ^ 53 then
    core.raise(("generate: seed must be an integer in [0, 2^53], got %s"):format(describe(seed)))
  end

  local eos_from = opts.eos_token_id ~= nil and "eos_token_id" or "the model's config.eos_token_id"
  local eos, eos_list = eos_set(opts.eos_token_id == nil and cfg.eos_token_id or opts.eos_token_id, eos_from)
  local pad, pad_from = opts.pad_token_id, "pad_token_id"
  if pad ~= nil then
    if not is_int(pad) or pad < 0 or pad >= V then
      core.raise(("generate: pad_token_id must be a token id in [0, %d), got %s"):format(V, describe(pad)))
    end
  else
    pad, pad_from = cfg.pad_token_id, "the model's config.pad_token_id"
    if pad == nil then pad, pad_from = eos_list[1], "the first eos_token_id (no pad_token_id)" end
  end
  -- finished rows are fed the pad token: it must be one the model can embed, if any row can finish
  local can_finish = false
  for x in pairs(eos) do if x < V then can_finish = true end end
  if can_finish and pad ~= nil and not (is_int(pad) and pad >= 0 and pad < V) then
    core.raise(("generate: finished rows continue with %s, %s, which is not a token id (vocab_size %d); pass pad_token_id")
               :format(pad_from, describe(pad), V))
  end

  -- the mask: 0/1, each row's padding on the left (positions count a row's real tokens, transformers' rule, so
  -- padding after a token would shift every later position), at least one token per row
  local mask_v
  if opts.attention_mask ~= nil then
    check_tensor("attention_mask", opts.attention_mask, B, T0)
    mask_v = values_of(opts.attention_mask)
    for b = 0, B - 1 do
      local seen = false
      for t = 0, T0 - 1 do
        local x = mask_v[b * T0 + t + 1]
        if x ~= 0 and x ~= 1 then
          core.raise(("generate: attention_mask[%d][%d] is %s, expected 0 or 1"):format(b, t, tostring(x)))
        end
        if x == 1 then seen = true
        elseif seen then
          core.raise(("generate: attention_mask row %d has padding at position %d after a token; generation needs "
                      .. "left padding (tokenizers: padding_side = 'left')"):format(b, t))
        end
      end
      if not seen then core.raise(("generate: attention_mask row %d has no tokens (all 0)"):format(b)) end
    end
  end
  return {B = B, T0 = T0, V = V, n = n, ids = ids_v, sample = sample, temperature = temperature, top_k = top_k, top_p = top_p,
          seed = seed, eos = eos, pad = pad, mask = mask_v}
end

-- generate(model, ids [B, T], {max_new_tokens = 20, temperature =, top_k =, top_p =, do_sample =, eos_token_id =,
--   pad_token_id =, seed = 0, attention_mask = [B, T] of 0/1 (1 = token, 0 = left padding)}) -> i64 [B, T + n]:
-- the prompt and the n <= max_new_tokens generated tokens. Greedy (argmax, as transformers' do_sample = False)
-- unless do_sample = true or a temperature > 0 is given; temperature 0 is greedy. top_k = 0 and top_p = 1 filter
-- nothing, as in transformers. A row that produced an eos token (eos_token_id, else the config's) continues with
-- pad tokens (pad_token_id, else the config's, else the first eos id), and decoding stops when every row has
-- finished. Bad options are errors raised before any work.
function M.generate(model, ids, opts)
  local o = parse(model, ids, opts)
  local B, T0, V, n = o.B, o.T0, o.V, o.n
  local sample, temperature, top_k, top_p = o.sample, o.temperature, o.top_k, o.top_p
  local eos, pad = o.eos, o.pad
  local mask = Tensor.empty({B, T0}, {dtype = "u8"})
  local pm = ffi.cast("uint8_t *", mask:data_ptr())
  if o.mask then
    for i = 0, B * T0 - 1 do pm[i] = o.mask[i + 1] end
  else
    ffi.fill(pm, B * T0, 1)
  end

  local out = Tensor.empty({B, T0 + n}, {dtype = "i64"})
  local po = ffi.cast("int64_t *", out:data_ptr())
  for b = 0, B - 1 do for t = 0, T0 - 1 do po[b * (T0 + n) + t] = o.ids[b * T0 + t + 1] end end

  local cache = Cache.new(B, T0 + n)
  local reset_at = rawget(model, "cache_reset_at")   -- a length past which the cache is recomputed once (Phi-3)
  local count = {}    -- real tokens so far per row: the next position id
  local done = {}
  for b = 0, B - 1 do count[b] = 0; done[b] = false end
  local function positions(T, valid_of)
    local pos = Tensor.empty({B, T}, {dtype = "i64"})
    local valid = Tensor.empty({B, T}, {dtype = "u8"})
    local pp, pv = ffi.cast("int64_t *", pos:data_ptr()), ffi.cast("uint8_t *", valid:data_ptr())
    for b = 0, B - 1 do
      for t = 0, T - 1 do
        local ok = valid_of(b, t)
        pv[b * T + t] = ok and 1 or 0
        pp[b * T + t] = ok and count[b] or 1   -- padding positions are 1, as transformers' masked_fill
        if ok then count[b] = count[b] + 1 end
      end
    end
    cache:advance(pos, valid)
    valid:free()
  end

  local was_training = model.training
  model:train(false)
  local produced = 0
  local ok, err = pcall(function()
    require("fsdp").no_grad(function()
      local input = ids
      positions(T0, function(b, t) return pm[b * T0 + t] ~= 0 end)
      for step = 1, n do
        local res = model(input, {cache = cache, last_only = true})
        cache:commit()
        if input ~= ids then input:free() end
        local logits = basic.to(res.logits, "f64"); res.logits:free()   -- [B, 1, V]
        local pl = ffi.cast("const double *", logits:data_ptr())
        local nxt = Tensor.empty({B, 1}, {dtype = "i64"})
        local pn = ffi.cast("int64_t *", nxt:data_ptr())
        for b = 0, B - 1 do
          local row = pl + b * V
          local tok
          if done[b] then tok = pad or 0
          elseif sample then
            local probs = probabilities(row, V, temperature or 1, top_k, top_p)
            local u, acc = uniform(o.seed, step, b), 0
            tok = probs[#probs][1]
            for _, e in ipairs(probs) do
              acc = acc + e[2]
              if u < acc then tok = e[1]; break end
            end
          else
            local best = 0
            for i = 1, V - 1 do if row[i] > row[best] then best = i end end
            tok = best
          end
          pn[b] = tok
          po[b * (T0 + n) + T0 + step - 1] = tok
          if eos[tok] then done[b] = true end
        end
        logits:free()
        produced = step
        local all_done = true
        for b = 0, B - 1 do if not done[b] then all_done = false end end
        if all_done or step == n then nxt:free(); break end
        local W = T0 + step
        if reset_at and W >= reset_at + 1 and cache.len <= reset_at then
          -- transformers' Phi-3: the first forward past original_max_position_embeddings drops the cache and
          -- recomputes the whole sequence, whose keys then all rotate with the long factors
          nxt:free()
          cache:reset()
          for b = 0, B - 1 do count[b] = 0 end
          local head = basic.narrow(out, 2, 1, W)
          input = basic.contiguous(head); head:free()
          positions(W, function(b, t) return t >= T0 or pm[b * T0 + t] ~= 0 end)
        else
          input = nxt
          positions(1, function() return true end)
        end
      end
    end)
  end)
  model:train(was_training)
  cache:free()
  mask:free()
  if not ok then error(err, 0) end
  if produced < n then
    local trimmed = basic.contiguous(basic.narrow(out, 2, 1, T0 + produced))
    out:free()
    out = trimmed
  end
  return out
end

return M
