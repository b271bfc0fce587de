-- lua/fsdp/dropout_keys.lua: the seed and key of every dropout mask (nn.Dropout and the attention-probability
-- dropout), so that a mask depends on the run alone: (run seed, rank, op counter). The seed is the run's
-- (fsdp.init{seed =}), never a module's or a build's, so a model built on meta and sharded by apply_plan draws the
-- masks of the same model built on cpu and wrapped by fsdp.ddp. One process-wide counter advances at every forward
-- call of any dropout, so steps and layers draw different masks; the rank is part of the key, so data-parallel
-- ranks draw different masks; and the same seed, rank and sequence of calls give the same masks. Activation
-- checkpointing (fsdp.autograd) saves the counter when a block first runs and replays it in the recompute, so the
-- recompute draws the forward's masks.
local core = require "fsdp.core"

local C = core.C
local M = {}

-- key = rank * 2^32 + counter: distinct (rank, counter) pairs give distinct keys, exact in a double for ranks
-- below 2^21; the engine hashes the key into the stream (engine/ops/ops_act.c, engine/ops/ops_attn.c).
local RANK_SHIFT = 2 ^ 32
local counter = 0

-- The world rank when the job has joined its ranks; 0 otherwise. It does not call fsdp.dist.rank(), which would
-- initialise distributed as a side effect of a dropout.
local function rank()
  if not C.fl_dist_is_initialized() then return 0 end
  return C.fl_comm_rank(C.fl_comm_world())
end

-- seed(): the seed of every mask: the run's (fsdp.dist.seed()), 0 when the run has none. Read at each call, so
-- fsdp.init{seed =} (or a checkpoint load that restores the run's seed) applies to the next mask.
local dist
function M.seed()
  dist = dist or require "fsdp.dist"   -- at the first mask: loading a layer does not load fsdp.dist
  return dist.seed() or 0
end

-- next(): the key of a new mask; advances the counter.
function M.next()
  counter = counter + 1
  if counter >= RANK_SHIFT then
    error(("dropout keys: the call counter reached %d; set_counter(0) to start a new sequence"):format(counter), 2)
  end
  return rank() * RANK_SHIFT + counter
end

-- counter(): calls so far (the key of the next call is built from counter() + 1).
function M.counter() return counter end

-- set_counter(n): the next call draws the key of call n + 1 (checkpoint replay; tests that restart a sequence).
function M.set_counter(n)
  if type(n) ~= "number" or n < 0 or n ~= math.floor(n) or n >= RANK_SHIFT then
    error(("dropout keys: set_counter: n must be an integer in [0, 2^32), got %s"):format(tostring(n)), 2)
  end
  counter = n
end

return M
