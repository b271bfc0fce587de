-- spec/checkpoint_rng_spec.lua: the random streams of a training checkpoint now that dropout masks are keyed by
-- the run's seed, the rank and the call (fsdp.dropout_keys), not by module seeds. A checkpoint saves the key
-- counter and the run's seed only; one written before (metadata.json rng.module_seeds, one seed per dropout
-- module) loads when every module seed is the seed this run's masks use, since those masks are then the same
-- bits, and otherwise stops with an error that says why and, where one exists, the fsdp.init call that resumes
-- it exactly. The oracle is the run that did not stop.
local ffi   = require "ffi"
local cjson = require "cjson"
local fsdp  = require "fsdp"
local D     = require "dist"
local keys  = require "fsdp.dropout_keys"

local ck = fsdp.checkpoint

local function tiny(seed)
  return fsdp.models.build(fsdp.models.tiny_config("gpt2", {resid_pdrop = 0.1, embd_pdrop = 0.1, attn_pdrop = 0.1}),
                           {seed = seed})
end

local function step(model, opt, k)
  local x = fsdp.empty({2, 16}, {dtype = "i64"})
  local p, s = x:data_ptr("int64_t *"), k
  for i = 0, 31 do s = (s * 1103515245 + 12345) % 2147483648; p[i] = s % 101 end
  local out = model(x, {labels = x})
  out.loss:backward()
  opt:step(); opt:zero_grad()
  return out.loss:item()
end

local function bytes(model)
  local out = {}
  for name, p in model:named_parameters() do out[name] = ffi.string(p:data_ptr(), p:numel() * 4) end
  return out
end

-- metadata.json as the version before this one wrote it: rng.module_seeds names every dropout module's seed
-- ("<module>.seed" for nn.Dropout) with the value `seed_of(name)`.
local function make_old(dir, model, seed_of)
  local path = dir .. "/metadata.json"
  local meta = cjson.decode(D.read_file(path))
  meta.rng.module_seeds = {}
  for name, m in model:named_modules() do
    if m.__name == "Dropout" then meta.rng.module_seeds[name .. ".seed"] = seed_of(name) end
  end
  local f = assert(io.open(path, "wb")); f:write(cjson.encode(meta)); f:close()
  return meta
end

-- Two steps, a checkpoint, two more steps; returns the checkpoint dir, the model and the losses after it.
local function run_and_save()
  local dir = D.tmpdir() .. "/ck"
  local a = tiny(1)
  local oa = fsdp.optim.AdamW(a:parameters(), {lr = 1e-2})
  keys.set_counter(0)
  for k = 1, 2 do step(a, oa, k) end
  ck.save(dir, {model = a, optimizer = oa, step = 2})
  local at = keys.counter()
  local after = {step(a, oa, 3), step(a, oa, 4)}
  return dir, a, after, at
end

local function resume(dir)
  local b = tiny(7)
  local ob = fsdp.optim.AdamW(b:parameters(), {lr = 1e-2})
  keys.set_counter(0)
  ck.load(dir, {model = b, optimizer = ob})
  return b, ob
end

describe("checkpoint random streams", function()
  it("saves the key counter and the run's seed, no module seeds, and resumes bit for bit", function()
    local dir, a, after, at = run_and_save()
    local meta = cjson.decode(D.read_file(dir .. "/metadata.json"))
    assert.is_nil(meta.rng.module_seeds)
    assert.same({at}, meta.rng.dropout_counter)
    local b, ob = resume(dir)
    assert.equal(at, keys.counter())
    assert.same(after, {step(b, ob, 3), step(b, ob, 4)})
    assert.same(bytes(a), bytes(b))
  end)

  it("an old checkpoint whose module seeds are all this run's mask seed (0: no run seed) loads and resumes exactly", function()
    assert.equal(0, keys.seed())
    local dir, a, after = run_and_save()
    make_old(dir, a, function() return 0 end)
    local b, ob = resume(dir)
    assert.same(after, {step(b, ob, 3), step(b, ob, 4)})
    assert.same(bytes(a), bytes(b))
  end)

  it("an old checkpoint with other module seeds is refused, naming the module, the seeds and the way to resume", function()
    local dir, a = run_and_save()
    make_old(dir, a, function() return 7 end)
    local ok, err = pcall(resume, dir)
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("checkpoint.load '" .. dir .. "': the checkpoint's dropout masks were keyed by "
      .. "module seeds ('transformer.drop.seed' = 7), this version keys them by the run's seed (0 here): resuming "
      .. "would draw other masks; fsdp.init{seed = 7} before loading draws the masks it drew", 1, true), err)
    -- seeds that differ between modules: no run seed reproduces them, so no hint
    make_old(dir, a, function(name) return name == "transformer.drop" and 7 or 0 end)
    ok, err = pcall(resume, dir)
    assert.is_false(ok)
    assert.matches("%('transformer.drop.seed' = 7%), this version keys them by the run's seed %(0 here%): resuming "
                   .. "would draw other masks$", tostring(err))
  end)

  -- last: fsdp.init{seed =} stays for the rest of this process
  it("with fsdp.init{seed = 7} the old checkpoint of module seeds 7 loads and draws the masks the old run drew", function()
    local dir, a = run_and_save()
    make_old(dir, a, function() return 7 end)
    fsdp.init{seed = 7}
    local b = resume(dir)
    assert.equal(7, keys.seed())
    -- the old version's nn.Dropout of seed 7 drew ops.dropout(x, p, 7, key) at each call: the restored model's
    -- next call draws exactly that mask
    local x = fsdp.ones({2, 16, 32})
    local at = keys.counter()
    local y = b.transformer.drop(x)
    local old = fsdp.F.dropout(x, 0.1, 7, at + 1)
    assert.equal(ffi.string(old:data_ptr(), x:numel() * 4), ffi.string(y:data_ptr(), x:numel() * 4))
    assert.are_not.equal(ffi.string(fsdp.F.dropout(x, 0.1, 0, at + 1):data_ptr(), x:numel() * 4),
                         ffi.string(y:data_ptr(), x:numel() * 4))   -- the seed is in the mask
  end)
end)
