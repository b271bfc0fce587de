-- spec/dist/sharded_load_spec.lua: from_pretrained with an FSDP plan on real ranks. Each rank reads only its own
-- rows of each tensor; the gathered model must equal the checkpoint bit for bit, every rank must hold only its
-- share, and a forward on the same batch gives one process's loss exactly (the same weights, the same compute).
local fsdp = require "fsdp"
local D    = require "dist"

local WORKER = "spec/workers/sharded_load_worker.lua"

local function same_bits(a, b, what)
  assert.same(a:shape(), b:shape(), what)
  assert.equal(a.dtype, b.dtype, what)
  local n = a:numel() * fsdp.C.fl_dtype_size(fsdp.C.fl_dtype_from_name(a.dtype))
  assert.is_true(require("ffi").string(a:data_ptr(), n) == require("ffi").string(b:data_ptr(), n), what)
end

describe("from_pretrained with fsdp_plan", function()
  -- a checkpoint with uneven shapes (vocab 97, hidden 40), written by one process
  local ckpt = D.tmpdir()
  local cfg = fsdp.models.tiny_config("gpt2", {vocab_size = 97, n_embd = 40, n_head = 4})
  local ref = fsdp.models.build(cfg, {seed = 11})
  fsdp.models.save_pretrained(ref, ckpt)
  local ids = fsdp.tensor({{3, 1, 4, 1, 5, 9, 2, 6}}, {dtype = "i64"})
  local ref_loss = ref(ids, {labels = ids}).loss:item()
  local file = fsdp.safetensors.load(ckpt .. "/model.safetensors")

  for _, n in ipairs {2, 3} do
    for _, plan in ipairs {"auto", "manual"} do
      it(("at %d ranks (%s plan) reads each rank's rows: gathered equals the checkpoint, loss equals one process")
         :format(n, plan), function()
        local res = D.run(n, WORKER, {ckpt, plan}, {timeout = 60})
        assert(res.code == 0 and not res.timed_out, res.output)
        local ranks = D.results(res)
        local gathered = fsdp.safetensors.load(res.dir .. "/gathered.safetensors")
        for name, t in pairs(file) do same_bits(gathered[name], t, name) end
        local total = 0
        for _, r in ipairs(ranks) do
          assert.equal(ref_loss, r.loss)
          total = total + r.shard_numel
          -- no rank holds the model: its shards are about 1/n of it (ceil rows per rank)
          assert.is_true(r.shard_numel < r.full_numel / n + 2000, ("rank %d holds %d of %d"):format(r.rank, r.shard_numel, r.full_numel))
        end
        assert.equal(ranks[1].full_numel, total)   -- the shards partition every parameter
      end)
    end
  end
end)
