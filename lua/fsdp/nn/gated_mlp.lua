-- lua/fsdp/nn/gated_mlp.lua: the Llama-family gated MLP, down(act(gate(x)) * up(x)); silu uses the fused swiglu.
-- fused = true (Phi-3): one gate_up_proj whose first `inner` output rows are the gate and the next the up.
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local Linear = require "fsdp.nn.linear"
local basic  = require "fsdp.ops.basic"
local ops    = require "fsdp.nn.ops"

local GatedMLP = Module.class("GatedMLP")
local OPTS = {activation = true, bias = true, fused = true, std = true, device = true, dtype = true, seed = true}

function GatedMLP.new(hidden, inner, opts)
  opts = core.check_opts("GatedMLP", opts, OPTS, 2)
  local act = opts.activation or "silu"
  if not ops.activations[act] then
    error(("GatedMLP: unsupported hidden_act '%s' (supported: silu, swish, gelu, gelu_new, gelu_pytorch_tanh, relu)")
          :format(tostring(act)), 2)
  end
  local self = Module.init(setmetatable({}, GatedMLP))
  self.activation, self.act = act, ops.activations[act]
  self.swiglu = act == "silu" or act == "swish"
  self.inner = inner
  local lo = {bias = opts.bias and true or false, std = opts.std, device = opts.device, dtype = opts.dtype, seed = opts.seed}
  if opts.fused then
    self:register_module("gate_up_proj", Linear.new(hidden, 2 * inner, lo))
  else
    self:register_module("gate_proj", Linear.new(hidden, inner, lo))
    self:register_module("up_proj", Linear.new(hidden, inner, lo))
  end
  self:register_module("down_proj", Linear.new(inner, hidden, lo))
  return self
end

local function halves(gu, inner)
  local gv, uv = basic.narrow(gu, gu:dim(), 1, inner), basic.narrow(gu, gu:dim(), inner + 1, inner)
  local g, u = basic.contiguous(gv), basic.contiguous(uv)
  gv:free(); uv:free()
  return g, u
end

function GatedMLP:forward(x)
  local g, u
  if self.gate_up_proj then
    local gu = self.gate_up_proj(x)
    g, u = halves(gu, self.inner); gu:free()
  else
    g, u = self.gate_proj(x), self.up_proj(x)
  end
  local h
  if self.swiglu then
    h = ops.swiglu(g, u)
  else
    local a = self.act(g)
    h = ops.mul(a, u); a:free()
  end
  g:free(); u:free()
  local out = self.down_proj(h); h:free()
  return out
end

function GatedMLP:extra_repr() return "act=" .. self.activation end

return GatedMLP
