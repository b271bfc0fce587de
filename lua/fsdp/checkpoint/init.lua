-- lua/fsdp/checkpoint/init.lua: `fsdp.checkpoint` — training checkpoints (save, load, wait: checkpoint/train.lua)
-- and Hugging Face exports (save_pretrained, from_pretrained: checkpoint/hf.lua).
local train = require "fsdp.checkpoint.train"

local M = {}

M.save, M.load, M.wait, M.async_status = train.save, train.load, train.wait, train.async_status
-- hf.lua builds models through fsdp.models: loaded on first use.
function M.save_pretrained(model, dir, opts) return require("fsdp.checkpoint.hf").save_pretrained(model, dir, opts) end
function M.from_pretrained(dir, opts) return require("fsdp.checkpoint.hf").from_pretrained(dir, opts) end

return M
