-- spec/checkpoint_spec.lua: training checkpoints in one process (fsdp.checkpoint; the multi-rank cases are
-- spec/dist/resume_spec.lua). The second code path is the run that did not stop: a model and optimizer loaded from
-- a checkpoint must take the next steps to the same bits as the originals continuing.
local ffi  = require "ffi"
local fsdp = require "fsdp"
local D    = require "dist"

local ck = fsdp.checkpoint

local function tiny(seed)
  return fsdp.models.build(fsdp.models.tiny_config("gpt2", {resid_pdrop = 0.1, embd_pdrop = 0.1, attn_pdrop = 0.1}),
                           {seed = seed})
end

local function ids(seed)
  local t = fsdp.empty({2, 16}, {dtype = "i64"})
  local p, x = t:data_ptr("int64_t *"), seed
  for i = 0, 31 do x = (x * 1103515245 + 12345) % 2147483648; p[i] = x % 101 end
  return t
end

local function step(model, opt, k)
  local x = ids(k)
  local out = model(x, {labels = x})
  out.loss:backward()
  fsdp.clip_grad_norm(model:parameters(), 0.5)
  opt:step(); opt:zero_grad()
  return out.loss:item()
end

local function bytes(model)
  local out = {}
  for name, p in model:named_parameters() do out[name] = ffi.string(p:data_ptr(), p:numel() * 4) end
  return out
end

describe("fsdp.checkpoint in one process", function()
  it("resumes SGD with momentum and two param groups bit for bit, even with the groups listed in another order", function()
    local dir = D.tmpdir() .. "/ck"
    local function sgd(model, reversed)
      local groups = fsdp.optim.param_groups(model, {weight_decay = 0.01})
      if reversed then   -- another order of groups and of the parameters inside them: state is matched by name
        groups = {groups[2], groups[1]}
        for _, g in ipairs(groups) do
          local r = {}
          for i = #g.params, 1, -1 do r[#r + 1] = g.params[i] end
          g.params = r
        end
      end
      return fsdp.optim.SGD(groups, {lr = 0.05, momentum = 0.9, nesterov = true})
    end
    local a = tiny(1)
    local oa = sgd(a)
    for k = 1, 2 do step(a, oa, k) end
    ck.save(dir, {model = a, optimizer = oa, step = 2})
    local b = tiny(7)
    local ob = sgd(b, true)
    ob.param_groups[1].lr, ob.param_groups[2].lr = 9, 9   -- restored from the checkpoint
    local res = ck.load(dir, {model = b, optimizer = ob})
    assert.equal(2, res.step)
    assert.equal(0.05, ob.param_groups[1].lr)
    assert.equal(0, ob.param_groups[1].weight_decay)     -- the no-decay group, first here, second when saved
    -- the dropout key counter is one per process: both runs start steps 3-4 from the restored one
    local keys = require "fsdp.dropout_keys"
    local at = keys.counter()
    local la = {step(a, oa, 3), step(a, oa, 4)}
    keys.set_counter(at)
    assert.same(la, {step(b, ob, 3), step(b, ob, 4)})
    assert.same(bytes(a), bytes(b))
    D.cleanup(dir:match("^(.*)/ck$"))
  end)

  it("refuses a regrouping that mixes the saved groups, naming both parameters", function()
    local dir = D.tmpdir() .. "/ck"
    local a = tiny(1)
    local oa = fsdp.optim.AdamW(fsdp.optim.param_groups(a), {lr = 1e-3})
    step(a, oa, 1)
    ck.save(dir, {model = a, optimizer = oa, step = 1})
    local b = tiny(1)
    local ok, err = pcall(ck.load, dir, {model = b, optimizer = fsdp.optim.AdamW(b:parameters())})
    assert.is_false(ok)
    assert.matches("param group 1 holds 'transformer.wte.weight' (saved in group 1) and", err, 1, true)
    assert.matches("(saved in group 2): regroup the parameters as they were saved", err, 1, true)
    ok, err = pcall(ck.load, dir, {model = b, optimizer = fsdp.optim.SGD(fsdp.optim.param_groups(b))})
    assert.is_false(ok)
    assert.matches("the checkpoint holds AdamW state, the optimizer is SGD", err, 1, true)
    D.cleanup(dir:match("^(.*)/ck$"))
  end)

  it("publishes an async save at wait(), the same bytes as a sync one, keeping files it does not own", function()
    local root = D.tmpdir()
    local a = tiny(3)
    local oa = fsdp.optim.AdamW(fsdp.optim.param_groups(a), {lr = 1e-3})
    step(a, oa, 1)
    ck.save(root .. "/sync", {model = a, optimizer = oa, step = 1, extra = {n = 1}})
    os.execute("mkdir -p " .. D.quote(root .. "/async"))
    local f = assert(io.open(root .. "/async/README", "wb")); f:write("mine"); f:close()
    ck.save(root .. "/async", {model = a, optimizer = oa, step = 1, extra = {n = 1}, async = true})
    assert.is_table(ck.async_status())
    step(a, oa, 2)   -- changes the weights: the save has its own copy
    assert.equal(root .. "/async", ck.wait())
    assert.is_nil(ck.async_status())
    assert.is_nil(ck.wait())
    for _, name in ipairs {"metadata.json", "rank-00000-of-00001.safetensors"} do
      assert.is_true(D.read_file(root .. "/sync/" .. name) == D.read_file(root .. "/async/" .. name), name)
    end
    assert.equal("mine", D.read_file(root .. "/async/README"))
    D.cleanup(root)
  end)

  it("checks its options and the JSON it writes, naming the value", function()
    local dir = D.tmpdir() .. "/ck"
    local a = tiny(1)
    local function err_of(opts)
      local ok, err = pcall(ck.save, dir, opts)
      assert.is_false(ok)
      return err
    end
    assert.matches("unknown option 'optimiser'", err_of({model = a, optimiser = 1}), 1, true)
    assert.matches("step must be an integer >= 0, got 1.5", err_of({model = a, step = 1.5}), 1, true)
    assert.matches("extra.f is a function", err_of({model = a, extra = {f = print}}), 1, true)
    assert.matches("extra.x is nan", err_of({model = a, extra = {x = 0 / 0}}):lower(), 1, true)
    assert.matches("extra mixes list entries with the key k", err_of({model = a, extra = {1, k = 2}}), 1, true)
    assert.matches("model is required", err_of({}), 1, true)
    local empty = D.tmpdir()
    local ok, err = pcall(ck.load, empty, {model = a})
    assert.is_false(ok)
    assert.matches("cannot read '" .. empty .. "/metadata.json'", err, 1, true)
    local m = fsdp.models.build(fsdp.models.tiny_config("gpt2"), {device = "meta"})
    assert.matches("has no data (on meta)", err_of({model = m}), 1, true)
    D.cleanup(empty); D.cleanup(dir:match("^(.*)/ck$"))
  end)
end)
