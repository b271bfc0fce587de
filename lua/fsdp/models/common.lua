-- lua/fsdp/models/common.lua: what every causal-LM file shares: the shifted cross-entropy loss (hf-models.md §0.7),
-- the forward option check, and tying the head to the embedding.
local ffi    = require "ffi"
local core   = require "fsdp.core"
local Tensor = require "fsdp.tensor"
local basic  = require "fsdp.ops.basic"
local ops    = require "fsdp.nn.ops"

local M = {}

-- labels: the loss; logits: with labels, also return the logits (the loss then comes from them; without it the head
-- and the loss are one fused op that never holds the [B*T, V] logits, and reading out.logits is an error that says
-- so); cache: a generation cache (fsdp/generate.lua) the attention reads and extends; last_only: logits of the last
-- position only.
M.FORWARD_OPTS = {labels = true, logits = true, cache = true, last_only = true}

-- The output of a training forward (labels, no logits = true): out.loss (and out.aux_loss), and an error instead
-- of a silent nil for out.logits, which was never made.
local FusedOutput = {__name = "CausalLMOutput", __index = function(_, k)
  if k == "logits" then
    core.raise("forward: out.logits was not computed: with labels the head and the loss are one fused op that "
               .. "never holds the logits; pass logits = true (model(ids, {labels = ids, logits = true})) to get them")
  end
end}
M.FusedOutput = FusedOutput

-- targets[b, t] = labels[b, t+1], and -100 at t = T-1: the model shifts labels, not input_ids. Empty sequences
-- (T = 0) have no targets: the loss is then a mean over nothing, NaN, as in transformers.
function M.shift_labels(labels, B, T)
  local lab = labels
  if labels.dtype ~= "i64" then lab = basic.to(labels, "i64") end
  local lc = basic.contiguous(lab)
  local src = ffi.cast("const int64_t *", lc:data_ptr())
  local out = Tensor.empty({B * T}, {dtype = "i64"})
  local dst = ffi.cast("int64_t *", out:data_ptr())
  for b = 0, T > 0 and B - 1 or -1 do
    local row = b * T
    for t = 0, T - 2 do dst[row + t] = src[row + t + 1] end
    dst[row + T - 1] = -100
  end
  if lc ~= labels then lc:free() end
  if lab ~= labels and lab ~= lc then lab:free() end
  return out
end

-- Mean cross-entropy over the non-ignored (label ~= -100) next-token targets of the whole batch.
function M.causal_lm_loss(logits, labels)
  local lp = logits._p
  local B, T, V = tonumber(lp.shape[0]), tonumber(lp.shape[1]), tonumber(lp.shape[2])
  local ls = labels:shape()
  if #ls ~= 2 or ls[1] ~= B or ls[2] ~= T then
    core.raise(("forward: labels %s do not match input_ids [%d, %d]"):format(labels:shape_str(), B, T))
  end
  local targets = M.shift_labels(labels, B, T)
  local flat = basic.view(logits, {B * T, V})
  local loss = ops.cross_entropy(flat, targets, -100)
  flat:free(); targets:free()
  return loss
end

-- Runs a ModuleList of decoder blocks over x, freeing each intermediate as soon as the next block has
-- consumed it (a checkpointed block keeps its input: it recomputes from it in backward). Extra arguments
-- go to every block.
function M.run_blocks(blocks, x, ...)
  for i = 1, blocks.n do
    local block = blocks[i]
    local y = block(x, ...)
    if not rawget(block, "checkpoint") then x:free() end
    x = y
  end
  return x
end

-- The forward of every *ForCausalLM: base model, head, and the shifted loss when labels are given.
function M.causal_lm_forward(self, class_name, base, input_ids, opts)
  opts = core.check_opts(class_name, opts, M.FORWARD_OPTS, 3)
  M.check_ids(class_name, input_ids)
  local h = base(input_ids, opts.cache)
  if opts.labels and not opts.logits and not opts.last_only then
    -- training: the head and the loss in one op, chunk by chunk over the rows
    local ls = opts.labels:shape()
    local B, T, H = h:size(1), h:size(2), h:size(3)
    if #ls ~= 2 or ls[1] ~= B or ls[2] ~= T then
      core.raise(("forward: labels %s do not match input_ids [%d, %d]"):format(opts.labels:shape_str(), B, T))
    end
    local targets = M.shift_labels(opts.labels, B, T)
    local flat = basic.view(h, {B * T, H}); h:free()
    local loss = self.lm_head(flat, targets)
    flat:free(); targets:free()
    return setmetatable({loss = loss}, FusedOutput)
  end
  if opts.last_only then
    local last = basic.narrow(h, 2, h:size(2), 1); h:free()
    h = last
  end
  local logits = self.lm_head(h); h:free()
  local loss
  if opts.labels then loss = M.causal_lm_loss(logits, opts.labels) end
  return {logits = logits, loss = loss}
end

function M.check_ids(what, input_ids)
  if not Tensor.is_tensor(input_ids) then
    core.raise(("%s: input_ids must be an integer tensor [B, T], got %s"):format(what, type(input_ids)))
  end
  if input_ids:dim() ~= 2 or (input_ids.dtype ~= "i64" and input_ids.dtype ~= "i32") then
    core.raise(("%s: input_ids must be an i64/i32 tensor [B, T], got %s %s"):format(what, input_ids.dtype, input_ids:shape_str()))
  end
end

return M
