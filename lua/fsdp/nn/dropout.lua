-- lua/fsdp/nn/dropout.lua: inverted dropout in training mode, identity in eval mode or with p = 0. Masks come from
-- the counter-based RNG keyed by (seed, rank, call counter) (fsdp.dropout_keys), so a run is reproducible from its
-- seed and ranks draw different masks.
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local ops    = require "fsdp.nn.ops"
local keys   = require "fsdp.dropout_keys"

local Dropout = Module.class("Dropout")
local OPTS = {seed = true}

function Dropout.new(p, opts)
  opts = core.check_opts("Dropout", opts, OPTS, 2)
  if type(p) ~= "number" or p < 0 or p >= 1 then
    error(("Dropout: p must be a number in [0, 1), got %s"):format(tostring(p)), 2)
  end
  local self = Module.init(setmetatable({}, Dropout))
  self.p, self.seed = p, opts.seed or 0
  return self
end

function Dropout:forward(x)
  if not self.training or self.p == 0 then return x end
  return ops.dropout(x, self.p, self.seed, keys.next())
end

function Dropout:extra_repr() return ("p=%s, inplace=False"):format(Module.repr_float(self.p)) end

return Dropout
