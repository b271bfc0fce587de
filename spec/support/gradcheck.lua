-- spec/support/gradcheck.lua: checks autograd against central differences (torch/nn's Jacobian.lua idea).
-- For a random upstream gradient u, the loss L = sum(fn(inputs) * u) has dL/dx from autograd; numerically
-- dL/dx_i = (L(x_i + eps) - L(x_i - eps)) / (2 eps) for every element of every input that requires grad.
-- Use f64 inputs: with eps = 1e-6 the truncation error is O(eps^2) and rounding O(1e-16 / eps) ~ 1e-10.
local fsdp = require "fsdp"
local F    = fsdp.F

local M = {}

local function loss_of(out, u)
  return F.sum(F.mul(out, u)):item()
end

-- gradcheck(fn, inputs, opts) -> max abs error, max abs analytic gradient (for context)
-- fn(unpack(inputs)) must return a tensor (or a tensor first); inputs that are leaves with requires_grad
-- are checked, others (ids, masks) are passed through. opts: eps (1e-6), seed (7).
function M.gradcheck(fn, inputs, opts)
  opts = opts or {}
  local eps, seed = opts.eps or 1e-6, opts.seed or 7
  for _, x in ipairs(inputs) do
    if fsdp.is_tensor(x) and x.requires_grad then
      assert(x.dtype == "f64", "gradcheck: differentiable inputs must be f64, got " .. x.dtype)
      assert(x:is_contiguous(), "gradcheck: differentiable inputs must be contiguous leaves")
      x.grad = nil
    end
  end
  local out = fn(unpack(inputs))
  local u = fsdp.randn(out:shape(), {dtype = "f64", seed = seed, name = "gradcheck.upstream"})
  F.backward(F.sum(F.mul(out, u)))
  local max_err, max_g = 0, 0
  for _, x in ipairs(inputs) do
    if fsdp.is_tensor(x) and x.requires_grad then
      local g = x.grad
      assert(g, "gradcheck: autograd gave no gradient for an input that requires grad")
      for i = 0, x:numel() - 1 do
        local v = x:get(i)
        x:set(i, v + eps)
        local lp = fsdp.no_grad(function() return loss_of(fn(unpack(inputs)), u) end)
        x:set(i, v - eps)
        local lm = fsdp.no_grad(function() return loss_of(fn(unpack(inputs)), u) end)
        x:set(i, v)
        local num, ana = (lp - lm) / (2 * eps), g:get(i)
        max_err = math.max(max_err, math.abs(num - ana))
        max_g = math.max(max_g, math.abs(ana))
      end
      x.grad = nil
    end
  end
  return max_err, max_g
end

return M
