-- lua/fsdp/nn/layer_norm.lua: LayerNorm over the last dim (biased variance), weight ones and bias zeros.
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local param  = require "fsdp.nn.param"
local ops    = require "fsdp.nn.ops"

local LayerNorm = Module.class("LayerNorm")
local OPTS = {eps = true, bias = true, device = true, dtype = true, seed = true}

function LayerNorm.new(dim, opts)
  opts = core.check_opts("LayerNorm", opts, OPTS, 2)
  local self = Module.init(setmetatable({}, LayerNorm))
  self.dim, self.eps = dim, opts.eps or 1e-5
  param.new(self, "weight", {dim}, {"ones"}, opts)
  if opts.bias ~= false then param.new(self, "bias", {dim}, {"zeros"}, opts) end
  return self
end

function LayerNorm:forward(x) return ops.layer_norm(x, self.weight, self.bias, self.eps) end

function LayerNorm:extra_repr()
  return ("(%d,), eps=%s, elementwise_affine=True, bias=%s"):format(self.dim, Module.repr_float(self.eps),
                                                                   Module.repr_bool(self.bias ~= nil))
end

return LayerNorm
