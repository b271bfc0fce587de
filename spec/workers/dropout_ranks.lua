-- spec/workers/dropout_ranks.lua: one rank of the dropout-key check of spec/attn_dropout_spec.lua. Started by
-- `fsdp-lua -n N spec/workers/dropout_ranks.lua DIR`; after fsdp.init, draws a plain dropout mask (nn.Dropout) and an
-- attention-probability mask (keys from fsdp.dropout_keys, as the layers take them) and writes both as strings of
-- 0/1 with the keys used, so the spec can check that ranks differ and that each rank's key is rank 2^32 + call.
local fsdp = require "fsdp"
local D    = require "dist"
local keys = require "fsdp.dropout_keys"

fsdp.init{seed = 3}   -- the run's seed keys every mask
keys.set_counter(0)
local function pattern(t)
  local p, s = t:contiguous():data_ptr("float *"), {}
  for i = 0, t:numel() - 1 do s[#s + 1] = p[i] ~= 0 and "1" or "0" end
  return table.concat(s)
end
local drop = fsdp.nn.Dropout.new(0.5)
local y = drop(fsdp.ones({512}))
-- q = k = 0: P uniform and never 0, so the zeros of P M / (1-p) with a one-hot v are the dropped entries
local T = 16
local v = fsdp.zeros({1, T, 1, T})
for j = 0, T - 1 do v:set(j * T + j, 1) end
local key = keys.next()
local o = fsdp.F.attention_dropout(fsdp.zeros({1, T, 1, T}), fsdp.zeros({1, T, 1, T}), v, 0.5, 0, 0.5, keys.seed(), key)
D.write(arg[1], fsdp.rank(), {seed = keys.seed(), dropout = pattern(y), attention = pattern(o), attention_key = key,
                              calls = keys.counter()})
