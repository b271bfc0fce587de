-- lua/fsdp/nn/embedding.lua: a lookup table weight [num, dim]; ids of any shape -> [..., dim].
local core   = require "fsdp.core"
local Module = require "fsdp.nn.module"
local param  = require "fsdp.nn.param"
local ops    = require "fsdp.nn.ops"

local Embedding = Module.class("Embedding")
local OPTS = {std = true, device = true, dtype = true, seed = true}

function Embedding.new(num_embeddings, embedding_dim, opts)
  opts = core.check_opts("Embedding", opts, OPTS, 2)
  local self = Module.init(setmetatable({}, Embedding))
  self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
  param.new(self, "weight", {num_embeddings, embedding_dim}, {"normal", std = opts.std or 0.02}, opts)
  return self
end

function Embedding:forward(ids) return ops.embedding(self.weight, ids) end

function Embedding:extra_repr() return ("%d, %d"):format(self.num_embeddings, self.embedding_dim) end

return Embedding
