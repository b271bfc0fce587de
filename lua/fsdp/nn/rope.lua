-- lua/fsdp/nn/rope.lua: the rotary frequencies of one attention module for every Hugging Face rope_type —
-- default, linear, dynamic, yarn, llama3, longrope — as transformers' modeling_rope_utils computes them: an f32
-- inv_freq [rot/2] and the attention scaling on cos/sin (hf-models.md §0.5, §0.10). Each step of the f32 tensor
-- arithmetic there is rounded to f32 here, so the tables agree to the last bit or two. dynamic and longrope depend
-- on the sequence length of the forward (the largest position + 1), as transformers' dynamic_rope_update:
--   dynamic   inv_freq recomputed when the length grows past the largest seen (from max_position_embeddings up),
--             back to the original when a forward is shorter than max_position_embeddings again; the state is
--             this object's, and every layer sees the same lengths, so all layers agree as transformers' one
--             rotary_emb does
--   longrope  the long factors when the length exceeds original_max_position_embeddings, else the short ones
-- Applying the rotation is the engine's (fl_rope / fl_rope_freqs in engine/ops/ops_embed.c).
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"

local Rope = {}
Rope.__index = Rope

local f32buf = ffi.new("float[1]")
local function f32(x) f32buf[0] = x; return f32buf[0] end   -- round to the nearest f32, as a torch f32 op

-- The keys each rope_type takes beyond rope_type, rope_theta and partial_rotary_factor (transformers' validation:
-- required = true, optional = false).
Rope.KEYS = {
  default  = {},
  linear   = {factor = true},
  dynamic  = {factor = true},
  yarn     = {factor = true, original_max_position_embeddings = true, attention_factor = false, beta_fast = false,
              beta_slow = false, mscale = false, mscale_all_dim = false, truncate = false},
  llama3   = {factor = true, original_max_position_embeddings = true, low_freq_factor = true, high_freq_factor = true},
  longrope = {short_factor = true, long_factor = true, original_max_position_embeddings = true, factor = false,
              attention_factor = false},
}

-- 1 / theta^(2i/dim) in f32: torch.arange(0, dim, 2).float() / dim, base ** that, then 1.0 / it.
local function base_powers(theta, dim)
  local p = {}
  for i = 0, dim / 2 - 1 do p[i + 1] = f32(f32(theta) ^ f32(2 * i / dim)) end
  return p
end

local function default_freqs(theta, dim)
  local inv = {}
  for i, p in ipairs(base_powers(theta, dim)) do inv[i] = f32(1 / p) end
  return inv
end

-- rp: the normalised rope_parameters; o = {rot_dim =, max_position_embeddings =}.
function Rope.new(rp, o)
  local self = setmetatable({rp = rp, type = rp.rope_type or "default", theta = rp.rope_theta or 10000.0,
                             dim = o.rot_dim, max_pos = o.max_position_embeddings}, Rope)
  if not Rope.KEYS[self.type] then
    core.raise(("rope: rope_type '%s' is not supported (valid: default, linear, dynamic, yarn, llama3, longrope)")
               :format(tostring(self.type)))
  end
  if self.type ~= "default" and type(self.max_pos) ~= "number" then
    core.raise(("rope: rope_type '%s' needs max_position_embeddings"):format(self.type))
  end
  self.max_seq_len_cached = self.max_pos
  return self
end

-- (inv_freq as a Lua array, attention scaling) for a forward of seq_len positions (nil: at construction).
function Rope:compute(seq_len)
  local rp, dim, theta, t = self.rp, self.dim, self.theta, self.type
  if t == "default" then return default_freqs(theta, dim), 1.0 end
  if t == "linear" then
    local inv = default_freqs(theta, dim)
    for i = 1, #inv do inv[i] = f32(inv[i] / f32(rp.factor)) end
    return inv, 1.0
  end
  if t == "dynamic" then
    if seq_len == nil or seq_len <= self.max_pos then return default_freqs(theta, dim), 1.0 end
    -- the length is a tensor there: the new base is an f32 0-dim tensor
    local factor = rp.factor
    local s = f32(f32(factor) * f32(seq_len))
    s = f32(s / f32(self.max_pos))
    s = f32(s - f32(factor - 1))
    s = f32(s ^ f32(dim / (dim - 2)))
    local base = f32(f32(theta) * s)
    local inv = {}
    for i = 0, dim / 2 - 1 do inv[i + 1] = f32(1 / f32(base ^ f32(2 * i / dim))) end
    return inv, 1.0
  end
  if t == "yarn" then
    local orig = rp.original_max_position_embeddings
    local factor = rp.factor or self.max_pos / orig
    local function mscale_of(scale, m)
      if scale <= 1 then return 1.0 end
      return 0.1 * (m or 1) * math.log(scale) + 1.0
    end
    local attn = rp.attention_factor
    if attn == nil then
      if rp.mscale and rp.mscale ~= 0 and rp.mscale_all_dim and rp.mscale_all_dim ~= 0 then
        attn = mscale_of(factor, rp.mscale) / mscale_of(factor, rp.mscale_all_dim)
      else
        attn = mscale_of(factor)
      end
    end
    local fast = (rp.beta_fast ~= nil and rp.beta_fast ~= 0) and rp.beta_fast or 32
    local slow = (rp.beta_slow ~= nil and rp.beta_slow ~= 0) and rp.beta_slow or 1
    local function correction_dim(rot)
      return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))
    end
    local low, high = correction_dim(fast), correction_dim(slow)
    if rp.truncate ~= false then low, high = math.floor(low), math.ceil(high) end
    low, high = math.max(low, 0), math.min(high, dim - 1)
    if low == high then high = high + 0.001 end   -- transformers' guard against a zero-width ramp
    local inv = {}
    for i, p in ipairs(base_powers(theta, dim)) do
      local extra, inter = f32(1 / p), f32(1 / f32(f32(factor) * p))
      local ramp = f32(f32(f32(i - 1) - f32(low)) / f32(high - low))
      ramp = math.min(math.max(ramp, 0), 1)
      local ef = f32(1 - ramp)
      inv[i] = f32(f32(inter * f32(1 - ef)) + f32(extra * ef))
    end
    return inv, attn
  end
  if t == "llama3" then
    local inv = default_freqs(theta, dim)
    local factor, lo, hi = rp.factor, rp.low_freq_factor, rp.high_freq_factor
    local old = rp.original_max_position_embeddings
    local lo_wave, hi_wave = f32(old / lo), f32(old / hi)
    for i = 1, #inv do
      local wave = f32(f32(2 * math.pi) / inv[i])
      local scaled = wave > lo_wave and f32(inv[i] / f32(factor)) or inv[i]
      if wave >= hi_wave and wave <= lo_wave then
        local smooth = f32(f32(f32(f32(old) / wave) - f32(lo)) / f32(hi - lo))
        scaled = f32(f32(f32(f32(1 - smooth) * scaled) / f32(factor)) + f32(smooth * scaled))
      end
      inv[i] = scaled
    end
    return inv, 1.0
  end
  -- longrope
  local orig = rp.original_max_position_embeddings
  local factor = rp.factor or self.max_pos / orig
  local attn = rp.attention_factor
  if attn == nil then
    attn = factor <= 1 and 1.0 or math.sqrt(1 + math.log(factor) / math.log(orig))
  end
  local ext = (seq_len and seq_len > orig) and rp.long_factor or rp.short_factor
  local inv = {}
  for i, p in ipairs(base_powers(theta, dim)) do inv[i] = f32(1 / f32(f32(ext[i]) * p)) end
  return inv, attn
end

local function table_of(inv)
  local t = Tensor.empty({#inv}, {dtype = "f32"})
  local p = ffi.cast("float *", t:data_ptr())
  for i, v in ipairs(inv) do p[i - 1] = v end
  return t
end

-- Whether the default frequencies of theta apply (fl_rope computes them itself).
function Rope:is_default() return self.type == "default" end

-- (inv_freq f32 [rot/2] tensor, attention scaling) for a forward whose largest position is seq_len - 1. The
-- tensor stays this object's.
function Rope:frequencies(seq_len)
  local t = self.type
  if t == "dynamic" then
    if seq_len > self.max_seq_len_cached then   -- growth
      self:set(self:compute(seq_len))
      self.max_seq_len_cached = seq_len
    elseif seq_len < self.max_pos and self.max_seq_len_cached > self.max_pos then   -- back to the original
      self:set(self:compute(nil))
      self.max_seq_len_cached = self.max_pos
    elseif not self.inv then
      self:set(self:compute(nil))
    end
  elseif t == "longrope" then
    local long = seq_len > self.rp.original_max_position_embeddings
    if self.inv == nil or self.long ~= long then
      self:set(self:compute(long and seq_len or nil))
      self.long = long
    end
  elseif not self.inv then
    self:set(self:compute(nil))
  end
  return self.inv, self.scale
end

function Rope:set(inv, scale)
  if self.inv then self.inv:free() end
  self.inv, self.scale = table_of(inv), scale
end

return Rope
