-- lua/fsdp/nn/embedding.lua: a lookup table weight [num, dim]; ids of any shape -> [..., dim]. padding_idx (0-based,
-- as torch's nn.Embedding): that row starts at zero and gets no gradient.
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local param  = require "fsdp.nn.param"
local ops    = require "fsdp.nn.ops"

local Embedding = Module.class("Embedding")
local OPTS = {std = true, padding_idx = true, device = true, dtype = true, seed = true}

function Embedding.new(num_embeddings, embedding_dim, opts)
  opts = core.check_opts("Embedding", opts, OPTS, 2)
  local self = Module.init(setmetatable({}, Embedding))
  self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
  local pad = opts.padding_idx
  if pad ~= nil and (type(pad) ~= "number" or pad ~= math.floor(pad) or pad < 0 or pad >= num_embeddings) then
    error(("Embedding: padding_idx must be an integer in [0, %d), got %s"):format(num_embeddings, tostring(pad)), 2)
  end
  self.padding_idx = pad
  param.new(self, "weight", {num_embeddings, embedding_dim},
            {"normal", std = opts.std or 0.02, zero_row = pad, row_size = embedding_dim}, opts)
  return self
end

function Embedding:forward(ids) return ops.embedding(self.weight, ids, self.padding_idx) end

function Embedding:extra_repr()
  return ("%d, %d%s"):format(self.num_embeddings, self.embedding_dim,
                             self.padding_idx and (", padding_idx=" .. self.padding_idx) or "")
end

return Embedding
