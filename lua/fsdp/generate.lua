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

local function check_ids(ids)
  if not Tensor.is_tensor(ids) or ids:dim() ~= 2 or (ids.dtype ~= "i64" and ids.dtype ~= "i32") then
    core.raise(("generate: ids must be an i64 tensor [B, T], got %s"):format(Tensor.is_tensor(ids)
               and (ids.dtype .. " " .. ids:shape_str()) or type(ids)))
  end
end

local function id_set(v, what)
  if v == nil then return {} end
  local list = type(v) == "table" and v or {v}
  local set = {}
  for _, x in ipairs(list) do
    if type(x) ~= "number" or x ~= math.floor(x) or x < 0 then
      core.raise(("generate: %s must be a token id or a list of them, got %s"):format(what, tostring(x)))
    end
    set[x] = true
  end
  return set, list[1]
end

-- generate(model, ids [B, T], {max_new_tokens = 20, temperature =, top_k =, top_p =, do_sample =, eos_token_id =,
--   pad_token_id =, seed = 0, attention_mask = u8/i64 [B, T] (1 = token, 0 = left padding)}) -> i64 [B, T + n]:
-- the prompt and the n <= max_new_tokens generated tokens. Greedy (argmax, as transformers' do_sample = False)
-- unless do_sample or a temperature > 0 is given. A row that produced an eos token continues with pad tokens
-- (pad_token_id, else the first eos id), and decoding stops when every row has finished.
function M.generate(model, ids, opts)
  opts = core.check_opts("generate", opts, OPTS, 2)
  check_ids(ids)
  local cfg = model.config or {}
  local B, T0 = ids:size(1), ids:size(2)
  if T0 < 1 then core.raise("generate: the prompt is empty (ids has no columns)") end
  local n = opts.max_new_tokens or 20
  if type(n) ~= "number" or n < 0 or n ~= math.floor(n) then
    core.raise(("generate: max_new_tokens must be an integer >= 0, got %s"):format(tostring(n)))
  end
  local temperature = opts.temperature
  local sample = opts.do_sample
  if sample == nil then sample = temperature ~= nil and temperature > 0 end
  if sample and not (type(temperature or 1) == "number" and (temperature or 1) > 0) then
    core.raise(("generate: sampling needs a temperature > 0, got %s"):format(tostring(temperature)))
  end
  local top_k, top_p = opts.top_k, opts.top_p
  if top_k ~= nil and (type(top_k) ~= "number" or top_k < 0 or top_k ~= math.floor(top_k)) then
    core.raise(("generate: top_k must be an integer >= 0, got %s"):format(tostring(top_k)))
  end
  if top_p ~= nil and (type(top_p) ~= "number" or not (top_p > 0 and top_p <= 1)) then
    core.raise(("generate: top_p must be in (0, 1], got %s"):format(tostring(top_p)))
  end
  local eos_ids = opts.eos_token_id
  if eos_ids == nil then eos_ids = cfg.eos_token_id end
  local eos, first_eos = id_set(eos_ids, "eos_token_id")
  local pad = opts.pad_token_id
  if pad == nil then pad = cfg.pad_token_id end
  if pad == nil then pad = first_eos end
  -- learned positions (GPT-2) end at n_positions; RoPE models run past max_position_embeddings, as transformers'
  local limit = cfg.n_positions
  if limit and T0 + n > limit then
    core.raise(("generate: %d prompt + %d new tokens exceed the model's %d positions"):format(T0, n, limit))
  end
  local V = cfg.vocab_size
  -- the mask: given (left padding) or all ones
  local mask = Tensor.empty({B, T0}, {dtype = "u8"})
  local pm = ffi.cast("uint8_t *", mask:data_ptr())
  if opts.attention_mask ~= nil then
    local am = opts.attention_mask
    if not Tensor.is_tensor(am) or am:dim() ~= 2 or am:size(1) ~= B or am:size(2) ~= T0 then
      core.raise(("generate: attention_mask must be [%d, %d] like ids, got %s"):format(B, T0,
                 Tensor.is_tensor(am) and am:shape_str() or type(am)))
    end
    local a64 = basic.to(am, "f64")
    local pa = ffi.cast("const double *", a64:data_ptr())
    for i = 0, B * T0 - 1 do pm[i] = pa[i] ~= 0 and 1 or 0 end
    a64:free()
  else
    ffi.fill(pm, B * T0, 1)
  end

  local out = Tensor.empty({B, T0 + n}, {dtype = "i64"})
  local po = ffi.cast("int64_t *", out:data_ptr())
  local ids64 = basic.to(ids, "i64")
  local pi = ffi.cast("const int64_t *", ids64:data_ptr())
  for b = 0, B - 1 do for t = 0, T0 - 1 do po[b * (T0 + n) + t] = pi[b * T0 + t] end end
  ids64:free()

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
            local u, acc = uniform(opts.seed or 0, step, b), 0
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
