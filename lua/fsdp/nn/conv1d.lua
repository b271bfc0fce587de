-- lua/fsdp/nn/conv1d.lua: GPT-2's Conv1D, y = x W + b with the weight stored [in, out] (transposed vs Linear).
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local param  = require "fsdp.nn.param"
local basic  = require "fsdp.ops.basic"

local Conv1D = Module.class("Conv1D")
local OPTS = {std = true, device = true, dtype = true, seed = true}

function Conv1D.new(in_features, out_features, opts)
  opts = core.check_opts("Conv1D", opts, OPTS, 2)
  local self = Module.init(setmetatable({}, Conv1D))
  self.in_features, self.out_features = in_features, out_features
  param.new(self, "weight", {in_features, out_features}, {"normal", std = opts.std or 0.02}, opts)
  param.new(self, "bias", {out_features}, {"zeros"}, opts)
  return self
end

function Conv1D:forward(x) return basic.linear(x, self.weight, self.bias, true) end

function Conv1D:extra_repr() return ("nf=%d, nx=%d"):format(self.out_features, self.in_features) end  -- transformers' order

return Conv1D
