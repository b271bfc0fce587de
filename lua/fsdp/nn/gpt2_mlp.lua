-- lua/fsdp/nn/gpt2_mlp.lua: GPT-2's MLP: c_fc (Conv1D [H, I]) -> activation (gelu_new by default) -> c_proj
-- (Conv1D [I, H]) -> dropout.
local core    = require "fsdp.core"
local Module  = require "fsdp.nn.module"
local Conv1D  = require "fsdp.nn.conv1d"
local Dropout = require "fsdp.nn.dropout"
local ops     = require "fsdp.nn.ops"

local GPT2MLP = Module.class("GPT2MLP")
local OPTS = {activation = true, resid_pdrop = true, std = true, proj_std = true, device = true, dtype = true, seed = true}

function GPT2MLP.new(hidden, inner, opts)
  opts = core.check_opts("GPT2MLP", opts, OPTS, 2)
  local act = opts.activation or "gelu_new"
  if not ops.activations[act] then
    error(("GPT2MLP: unsupported activation_function '%s' (supported: gelu_new, gelu_pytorch_tanh, gelu, silu, swish, relu)")
          :format(tostring(act)), 2)
  end
  local self = Module.init(setmetatable({}, GPT2MLP))
  self.activation, self.act = act, ops.activations[act]
  local lo = {std = opts.std, device = opts.device, dtype = opts.dtype, seed = opts.seed}
  self:register_module("c_fc", Conv1D.new(hidden, inner, lo))
  lo.std = opts.proj_std or opts.std
  self:register_module("c_proj", Conv1D.new(inner, hidden, lo))
  self:register_module("dropout", Dropout.new(opts.resid_pdrop or 0))
  return self
end

function GPT2MLP:forward(x)
  local h = self.c_fc(x)
  local a = self.act(h); h:free()
  local out = self.c_proj(a); a:free()
  local y = self.dropout(out)
  if y ~= out then out:free() end
  return y
end

function GPT2MLP:extra_repr() return "act=" .. self.activation end

return GPT2MLP
