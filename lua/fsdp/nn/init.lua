-- lua/fsdp/nn/init.lua: `fsdp.nn` — the Module base class and the layers the models are built from.
return {
  Module = require "fsdp.nn.module",
  ModuleList = require "fsdp.nn.module_list",
  Linear = require "fsdp.nn.linear",
  Conv1D = require "fsdp.nn.conv1d",
  Embedding = require "fsdp.nn.embedding",
  LayerNorm = require "fsdp.nn.layer_norm",
  RMSNorm = require "fsdp.nn.rms_norm",
  Dropout = require "fsdp.nn.dropout",
  GPT2Attention = require "fsdp.nn.gpt2_attention",
  Attention = require "fsdp.nn.attention",
  GPT2MLP = require "fsdp.nn.gpt2_mlp",
  GatedMLP = require "fsdp.nn.gated_mlp",
}
