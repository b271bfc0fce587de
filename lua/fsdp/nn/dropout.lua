-- lua/fsdp/nn/dropout.lua: inverted dropout in training mode, identity in eval mode or with p = 0. Masks come from
-- the counter-based RNG keyed by (run seed, rank, call counter) (fsdp.dropout_keys), so a run is reproducible from
-- its seed (fsdp.init{seed =}) however the model was built or wrapped, and ranks draw different masks.
local Module = require "fsdp.nn.module"
local ops    = require "fsdp.nn.ops"
local keys   = require "fsdp.dropout_keys"

local Dropout = Module.class("Dropout")

function Dropout.new(p, opts)
  if opts ~= nil then   -- a per-module seed would make the masks depend on how the model was built
    error("Dropout.new(p) takes no options: masks are keyed by the run's seed (fsdp.init{seed =}), the rank and the "
          .. "call", 2)
  end
  if type(p) ~= "number" or p < 0 or p >= 1 then
    error(("Dropout: p must be a number in [0, 1), got %s"):format(tostring(p)), 2)
  end
  local self = Module.init(setmetatable({}, Dropout))
  self.p = p
  return self
end

function Dropout:forward(x)
  if not self.training or self.p == 0 then return x end
  return ops.dropout(x, self.p, keys.seed(), keys.next())
end

function Dropout:extra_repr() return ("p=%s, inplace=False"):format(Module.repr_float(self.p)) end

return Dropout
