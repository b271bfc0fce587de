-- lua/fsdp/nn/linear.lua: y = x W^T + b, weight stored [out, in] as torch.nn.Linear / Hugging Face.
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local param  = require "fsdp.nn.param"
local basic  = require "fsdp.ops.basic"
local ops    = require "fsdp.nn.ops"

local Linear = Module.class("Linear")
local OPTS = {bias = true, std = true, device = true, dtype = true, seed = true}

-- opts: bias (default true), std (weight init std, default 0.02 as HF's initializer_range), device, dtype, seed.
function Linear.new(in_features, out_features, opts)
  opts = core.check_opts("Linear", opts, OPTS, 2)
  local self = Module.init(setmetatable({}, Linear))
  self.in_features, self.out_features = in_features, out_features
  param.new(self, "weight", {out_features, in_features}, {"normal", std = opts.std or 0.02}, opts)
  if opts.bias ~= false then param.new(self, "bias", {out_features}, {"zeros"}, opts) end
  return self
end

-- forward(x) -> x W^T + b. forward(h [N, in], targets [N]) -> the mean cross-entropy of h W^T over targets ~= -100
-- without the [N, out] logits (a bias-free language-model head): called through the module, so FSDP gathers the
-- weight as for a plain forward.
function Linear:forward(x, targets)
  if targets == nil then return basic.linear(x, self.weight, self.bias, false) end
  if self.bias then core.raise("Linear: the fused cross-entropy head takes no bias") end
  return ops.linear_cross_entropy(x, self.weight, targets, -100)
end

function Linear:extra_repr()
  return ("in_features=%d, out_features=%d, bias=%s"):format(self.in_features, self.out_features,
                                                    Module.repr_bool(self.bias ~= nil))
end

return Linear
