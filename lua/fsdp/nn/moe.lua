-- lua/fsdp/nn/moe.lua: the sparse mixture-of-experts block of Mixtral, Qwen2-MoE and Qwen3-MoE (hf-models.md §9).
-- A router (Linear [E, H], no bias) scores every token; softmax in f32, top-k, optionally renormalised; each token
-- goes to its k experts, each a gated MLP. Compute is grouped by expert: the tokens are gathered once in expert
-- order (within an expert: by choice slot, then token, as transformers' torch.where), each expert runs one matmul
-- chain over its rows, the outputs are weighted and added into the token rows by one scatter-add whose sums run
-- in expert order, as transformers' index_add_ loop. Every expert runs, those without tokens on zero rows, so
-- every expert has a gradient (zero) and every rank issues the same collectives. Qwen2-MoE adds a shared expert
-- scaled by sigmoid(shared_expert_gate(x)). The router logits of the last forward stay on the block
-- (router_logits) for the auxiliary load-balancing loss (moe.aux_loss).
local ffi        = require "ffi"
local core       = require "fsdp.core"
local Tensor     = require "fsdp.tensor"
local Module     = require "fsdp.nn.module"
local ModuleList = require "fsdp.nn.module_list"
local Linear     = require "fsdp.nn.linear"
local basic      = require "fsdp.ops.basic"
local nnf        = require "fsdp.ops.nn"
local ops        = require "fsdp.nn.ops"

local M = {}

-- ---- one expert: down(act(gate(x)) * up(x)) under the checkpoint's names ----
local Expert = Module.class("MoEExpert")
M.Expert = Expert

-- names = {gate =, up =, down =, order = {...}}: Mixtral's w1 (gate), w3 (up), w2 (down), registered w1, w2, w3;
-- Qwen's gate_proj, up_proj, down_proj.
function Expert.new(hidden, inner, names, o)
  local self = Module.init(setmetatable({}, Expert))
  self.names = names
  local dims = {[names.gate] = {hidden, inner}, [names.up] = {hidden, inner}, [names.down] = {inner, hidden}}
  for _, n in ipairs(names.order) do
    self:register_module(n, Linear.new(dims[n][1], dims[n][2], {bias = false, std = o.std, device = o.device, dtype = o.dtype}))
  end
  self.act = ops.activations[o.activation or "silu"]
  self.swiglu = o.activation == nil or o.activation == "silu" or o.activation == "swish"
  return self
end

function Expert:forward(x)
  local n = self.names
  local g, u = self[n.gate](x), self[n.up](x)
  local h
  if self.swiglu then h = ops.swiglu(g, u)
  else
    local a = self.act(g)
    h = ops.mul(a, u); a:free()
  end
  g:free(); u:free()
  local out = self[n.down](h); h:free()
  return out
end

-- ---- the block ----
local SparseMoE = Module.class("SparseMoeBlock")
M.SparseMoE = SparseMoE

local OPTS = {num_experts = true, top_k = true, inner = true, renormalize = true, expert_names = true, gate_last = true,
              shared_inner = true, activation = true, std = true, device = true, dtype = true}

function SparseMoE.new(hidden, opts)
  opts = core.check_opts("SparseMoE", opts, OPTS, 2)
  local E, k = opts.num_experts, opts.top_k
  if type(E) ~= "number" or E < 1 or type(k) ~= "number" or k < 1 or k > E then
    error(("SparseMoE: need 1 <= top_k <= num_experts, got top_k %s, num_experts %s"):format(tostring(k), tostring(E)), 2)
  end
  local self = Module.init(setmetatable({}, SparseMoE))
  self.is_block = true   -- the auto plan keeps only outermost blocks: inside a decoder layer it is not a unit
  self.hidden, self.num_experts, self.top_k, self.renormalize = hidden, E, k, opts.renormalize and true or false
  local o = {std = opts.std, device = opts.device, dtype = opts.dtype, activation = opts.activation}
  -- gate_last: Qwen3-MoE registers the experts before the router (state-dict order)
  local function gate() self:register_module("gate", Linear.new(hidden, E, {bias = false, std = opts.std,
                                                                           device = opts.device, dtype = opts.dtype})) end
  if not opts.gate_last then gate() end
  local experts = ModuleList.new()
  for _ = 1, E do experts:append(Expert.new(hidden, opts.inner, opts.expert_names, o)) end
  self:register_module("experts", experts)
  if opts.gate_last then gate() end
  if opts.shared_inner then
    local names = {gate = "gate_proj", up = "up_proj", down = "down_proj", order = {"gate_proj", "up_proj", "down_proj"}}
    self:register_module("shared_expert", Expert.new(hidden, opts.shared_inner, names, o))
    self:register_module("shared_expert_gate", Linear.new(hidden, 1, {bias = false, std = opts.std, device = opts.device,
                                                                      dtype = opts.dtype}))
  end
  return self
end

-- The rows of every expert in dispatch order: for each expert e (ascending), the (slot, token) pairs that chose it,
-- by slot then token. Returns the token index and the position in the flattened [N*k] weights of each row, and the
-- row count of each expert.
local function dispatch(idx, N, k, E)
  local pi = ffi.cast("const int64_t *", idx:data_ptr())
  local per = {}
  for e = 0, E - 1 do per[e] = {} end
  for s = 0, k - 1 do
    for t = 0, N - 1 do
      local e = tonumber(pi[t * k + s])
      local list = per[e]
      list[#list + 1] = t * k + s
    end
  end
  local rows = Tensor.empty({N * k}, {dtype = "i64"})
  local wpos = Tensor.empty({N * k}, {dtype = "i64"})
  local pr, pw = ffi.cast("int64_t *", rows:data_ptr()), ffi.cast("int64_t *", wpos:data_ptr())
  local counts, at = {}, 0
  for e = 0, E - 1 do
    counts[e + 1] = #per[e]
    for _, p in ipairs(per[e]) do
      pr[at], pw[at] = math.floor(p / k), p
      at = at + 1
    end
  end
  return rows, wpos, counts
end

function SparseMoE:forward(x)
  local H = self.hidden
  local N = x:numel() / H
  local E, k = self.num_experts, self.top_k
  local flat = basic.view(x, {N, H})
  M.drop_router_logits(self)
  local logits = self.gate(flat)                        -- [N, E]
  rawset(self, "router_logits", logits)                 -- an activation, not a parameter: a raw field
  local probs = nnf.softmax(logits, -1)
  local w, idx = nnf.topk(probs, k)                     -- [N, k], descending
  probs:free()
  if self.renormalize then
    local s = basic.sum(w, 2, true)
    local wn = basic.div(w, s); w:free(); s:free()
    w = wn
  end
  local rows, wpos, counts = dispatch(idx, N, k, E)
  idx:free()
  local xs = basic.index_select(flat, 1, rows)          -- [N*k, H] in dispatch order
  local outs, at = {}, 1
  for e = 1, E do
    local part = basic.narrow(xs, 1, at, counts[e])
    outs[e] = self.experts[e](part)
    part:free()
    at = at + counts[e]
  end
  xs:free()
  local ycat = basic.cat(outs, 1); for e = 1, E do outs[e]:free() end
  local wflat = basic.view(w, {N * k}); w:free()
  local we = basic.index_select(wflat, 1, wpos); wflat:free(); wpos:free()
  local wcol = basic.view(we, {N * k, 1}); we:free()
  local weighted = ops.mul(ycat, wcol); ycat:free(); wcol:free()
  local target = basic.contiguous(basic.expand(basic.view(rows, {N * k, 1}), {N * k, H}))
  rows:free()
  local zeros = Tensor.zeros({N, H}, {dtype = weighted.dtype})
  local out = nnf.scatter_add(zeros, 1, target, weighted)
  zeros:free(); target:free(); weighted:free()
  if self.shared_expert then
    local sh = self.shared_expert(flat)
    local sg = self.shared_expert_gate(flat)
    local gate = basic.sigmoid(sg); sg:free()
    local scaled = ops.mul(sh, gate); sh:free(); gate:free()
    local sum = ops.add(out, scaled); out:free(); scaled:free()
    out = sum
  end
  flat:free()
  local shaped = basic.view(out, x:shape()); out:free()
  return shaped
end

function SparseMoE:extra_repr()
  return ("experts=%d, top_k=%d%s%s"):format(self.num_experts, self.top_k, self.renormalize and ", renormalize" or "",
                                            self.shared_expert and ", shared_expert" or "")
end

-- Where expert e's `which` matrix (names.gate / .up / .down) lies in transformers v5's fused layout under `prefix`
-- (prefix.gate_up_proj [E, 2I, H]: gate rows then up rows per expert; prefix.down_proj [E, H, I]): the key, the
-- element offset of the expert's rows (one contiguous range), and the fused tensor's shape.
function M.fused_source(prefix, e, which, names, E, I, H)
  if which == names.gate then return prefix .. ".gate_up_proj", e * 2 * I * H, {E, 2 * I, H} end
  if which == names.up then return prefix .. ".gate_up_proj", e * 2 * I * H + I * H, {E, 2 * I, H} end
  if which == names.down then return prefix .. ".down_proj", e * H * I, {E, H, I} end
  return nil
end

-- Frees the router logits a forward left on the block.
function M.drop_router_logits(block)
  local l = rawget(block, "router_logits")
  if l then l:free(); rawset(block, "router_logits", nil) end
end

-- aux_loss(blocks, top_k): transformers' load_balancing_loss_func over the router logits of `blocks` (in layer
-- order): E * sum_e (tokens routed to e over all layers and slots / rows) * (router probability of e summed over
-- all layers' tokens / rows). Differentiable through the probabilities; the counts are constants.
function M.aux_loss(blocks, E, k)
  local prob_sum, counts, rows = nil, ffi.new("double[?]", E), 0
  for _, b in ipairs(blocks) do
    local logits = b.router_logits
    local p = nnf.softmax(logits, -1)
    local _, idx = nnf.topk(p, k)
    local pi = ffi.cast("const int64_t *", idx:data_ptr())
    for i = 0, idx:numel() - 1 do counts[pi[i]] = counts[pi[i]] + 1 end
    idx:free()
    local s = basic.sum(p, 1); p:free()
    if prob_sum == nil then
      local z = Tensor.zeros({E}, {dtype = s.dtype})
      prob_sum = ops.add(z, s); z:free()
    else
      local nx = ops.add(prob_sum, s); prob_sum:free()
      prob_sum = nx
    end
    s:free()
    rows = rows + logits:size(1)
  end
  local frac = Tensor.empty({E}, {dtype = prob_sum.dtype})
  for e = 0, E - 1 do frac:set(e, counts[e]) end
  -- tokens_per_expert / rows and prob_sum / rows, each rounded as torch rounds them, then their dot product x E
  local f = basic.div(frac, rows); frac:free()
  local pm = basic.div(prob_sum, rows); prob_sum:free()
  local prod = ops.mul(f, pm); f:free(); pm:free()
  local tot = basic.sum(prod); prod:free()
  local out = basic.mul(tot, E); tot:free()
  return out
end

return M
