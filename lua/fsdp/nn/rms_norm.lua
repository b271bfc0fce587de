-- lua/fsdp/nn/rms_norm.lua: RMSNorm as Hugging Face's LlamaRMSNorm, weight ones.
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local param  = require "fsdp.nn.param"
local ops    = require "fsdp.nn.ops"

local RMSNorm = Module.class("RMSNorm")
local OPTS = {eps = true, device = true, dtype = true, seed = true}

function RMSNorm.new(dim, opts)
  opts = core.check_opts("RMSNorm", opts, OPTS, 2)
  local self = Module.init(setmetatable({}, RMSNorm))
  self.dim, self.eps = dim, opts.eps or 1e-6
  param.new(self, "weight", {dim}, {"ones"}, opts)
  return self
end

function RMSNorm:forward(x) return ops.rms_norm(x, self.weight, self.eps) end

function RMSNorm:extra_repr() return ("(%d,), eps=%s"):format(self.dim, Module.repr_float(self.eps)) end

return RMSNorm
