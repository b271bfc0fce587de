-- spec/dist/ddp_spec.lua: fsdp.ddp against single-rank training. Real ranks run spec/workers/ddp_train.lua and
-- write what they saw (losses, grad norms, weights, errors); this file compares the runs.
local ffi  = require "ffi"
local D    = require "dist"   -- spec/support/dist.lua: launches N ranks under a time limit, reads their files

local WORKER = "spec/workers/ddp_train.lua"

-- Runs the worker on n ranks (a tiny model: seconds; 60 s is a hang); returns {reports = {[r] = table},
-- weights = {[r] = {bytes =, n =}}} with r 0-based.
local function run(n, ...)
  local res = D.run(n, WORKER, {...}, {timeout = 60})
  assert(res.code == 0, ("%d ranks, %s: exit %d\n%s"):format(n, table.concat({...}, " "), res.code, res.output))
  local all = D.results(res, n)
  local out = {reports = {}, weights = {}}
  for r = 0, n - 1 do
    out.reports[r] = all[r + 1]
    local bytes = D.read_file(("%s/rank%d.bin"):format(res.dir, r))
    if bytes then out.weights[r] = {bytes = bytes, n = #bytes / 4} end
  end
  D.cleanup(res)
  return out
end

local function floats(w) return ffi.cast("const float *", w.bytes) end

local function max_abs_diff(a, b)
  assert.equal(a.n, b.n)
  local pa, pb, m = floats(a), floats(b), 0
  for i = 0, a.n - 1 do m = math.max(m, math.abs(pa[i] - pb[i])) end
  return m
end

local function rel(a, b) return math.abs(a - b) / math.max(math.abs(b), 1e-30) end

-- Every rank of a DDP run must hold bit-identical replicas and report the same losses and norms.
local function assert_replicas_equal(run_, n)
  for r = 1, n - 1 do
    assert.is_true(run_.weights[r].bytes == run_.weights[0].bytes, ("rank %d's weights differ from rank 0's"):format(r))
    for s = 1, #run_.reports[0].losses do
      assert.equal(run_.reports[0].losses[s], run_.reports[r].losses[s])
      assert.equal(run_.reports[0].norms[s], run_.reports[r].norms[s])
    end
  end
end

-- 1e-5: the runs differ only in the order of f32 sums (a rank's slice vs the whole batch in the matmuls and
-- the loss mean, then the average over ranks): each op is off by ~1e-7 relative and 3 AdamW steps at lr 1e-3
-- keep the weights within ~1e-7 of each other. A real fault (a missing average, a wrong slice, unsynced
-- replicas) is off by 1e-3 or more.
local TOL = 1e-5

describe("fsdp.ddp", function()
  for _, model in ipairs {"gpt2", "llama"} do
    describe(model, function()
      local base
      setup(function() base = run(1, "case=train", "model=" .. model, "wrap=0") end)

      for _, n in ipairs {2, 3} do
        it(("on %d ranks matches 1 rank on the full batch (losses, grad norms, weights within 1e-5)"):format(n), function()
          local got = run(n, "case=train", "model=" .. model)
          assert_replicas_equal(got, n)
          for s = 1, 3 do
            local l, bl = got.reports[0].losses[s], base.reports[0].losses[s]
            assert.is_true(rel(l, bl) < TOL, ("step %d loss %.9g vs %.9g"):format(s, l, bl))
            local g, bg = got.reports[0].norms[s], base.reports[0].norms[s]
            assert.is_true(rel(g, bg) < TOL, ("step %d grad norm %.9g vs %.9g"):format(s, g, bg))
          end
          local d = max_abs_diff(got.weights[0], base.weights[0])
          assert.is_true(d < TOL, ("weights differ by %g"):format(d))
          -- and the weights moved: the comparison is not between two untouched initialisations
          local i0 = run(1, "case=train", "model=" .. model, "wrap=0", "steps=0")
          assert.is_true(max_abs_diff(got.weights[0], i0.weights[0]) > 1e-4)
        end)
      end

      it("with 2 micro-batches (sync off, then on) equals one step on the concatenated batch", function()
        -- global batch 8 on 2 ranks: each rank's 4 rows as one batch, or as 2 + 2 with gradient accumulation
        local one = run(2, "case=train", "model=" .. model, "batch=8")
        local acc = run(2, "case=accum", "model=" .. model, "batch=8")
        assert_replicas_equal(acc, 2)
        -- the first micro-step did not communicate: the ranks' local grads still differ
        assert.are_not.equal(acc.reports[0].local_ss[1], acc.reports[1].local_ss[1])
        for s = 1, 3 do
          assert.is_true(rel(acc.reports[0].losses[s], one.reports[0].losses[s]) < TOL)   -- same 1e-5 reasoning
          assert.is_true(rel(acc.reports[0].norms[s], one.reports[0].norms[s]) < TOL)
        end
        local d = max_abs_diff(acc.weights[0], one.weights[0])
        assert.is_true(d < TOL, ("weights differ by %g"):format(d))
      end)
    end)
  end

  it("runs over a mesh: 1-D as is, 2-D (dp_replicate x dp_shard) flattened into one group", function()
    local base = run(1, "case=train", "model=gpt2", "wrap=0", "batch=8")
    for _, c in ipairs {{2, "1d"}, {4, "2d"}} do
      local n = c[1]
      local got = run(n, "case=train", "model=gpt2", "batch=8", "mesh=" .. c[2])
      assert.equal(n, got.reports[0].group_size)
      assert_replicas_equal(got, n)
      for s = 1, 3 do
        assert.is_true(rel(got.reports[0].losses[s], base.reports[0].losses[s]) < TOL)   -- TOL: see above
        assert.is_true(rel(got.reports[0].norms[s], base.reports[0].norms[s]) < TOL)
      end
      local d = max_abs_diff(got.weights[0], base.weights[0])
      assert.is_true(d < TOL, ("%s mesh: weights differ by %g"):format(c[2], d))
    end
  end)

  it("gives bit-identical results with many small buckets and one big bucket", function()
    -- Exact: each element is reduced by itself, in rank order, whatever bucket it travels in.
    for _, n in ipairs {2, 3} do
      local big = run(n, "case=train", "model=llama", "cap=1000")
      local small = run(n, "case=train", "model=llama", "cap=0.01")   -- 10 KiB: about one weight matrix each
      assert.equal(1, #big.reports[0].buckets)
      assert.is_true(#small.reports[0].buckets >= 5, #small.reports[0].buckets .. " buckets")
      assert.is_true(small.weights[0].bytes == big.weights[0].bytes, ("%d ranks: weights differ"):format(n))
      for s = 1, 3 do
        assert.equal(big.reports[0].losses[s], small.reports[0].losses[s])
        assert.equal(big.reports[0].norms[s], small.reports[0].norms[s])
      end
    end
  end)

  it("fills buckets in reverse registration order up to the cap, as torch's reducer", function()
    local got = run(2, "case=train", "model=gpt2", "cap=0.01")
    local names = got.reports[0].params          -- registration order
    local seen = {}
    for _, b in ipairs(got.reports[0].buckets) do
      for _, nm in ipairs(b) do seen[#seen + 1] = nm end
    end
    assert.equal(#names, #seen)
    for i = 1, #names do assert.equal(names[#names + 1 - i], seen[i]) end
  end)

  for _, n in ipairs {2, 3} do
    it(("averages a grad used on some ranks only, with zeros elsewhere; unused everywhere stays nil (%d ranks)"):format(n), function()
      local got = run(n, "case=unused")
      for r = 0, n - 1 do
        local rep = got.reports[r]
        -- broadcast: every rank starts from rank 0's a (= 1)
        assert.same({1, 1, 1}, rep.a_after_wrap)
        -- rank 0: d/da sum(a*a) = 2a = 2, d/db sum(b) = 1; other ranks: d/da sum(a) = 1, b unused (zeros)
        local ga = (2 + (n - 1)) / n
        for i = 1, 3 do assert.is_true(math.abs(rep.grads.a[i] - ga) < 1e-7) end   -- f32 rounding of ga
        for i = 1, 2 do for j = 1, 2 do assert.is_true(math.abs(rep.grads.b[i][j] - 1 / n) < 1e-7) end end
        assert.equal("none", rep.grads.c)
        assert.is_true(rep.no_sync_error)
        assert.is_true(rep.sync_after)
      end
      assert.same({6, 6}, got.reports[0].other_grad)   -- a backward outside the model, on rank 0 alone
    end)
  end

  it("fails cleanly on every rank when a parameter's shape differs across ranks", function()
    local got = run(2, "case=mismatch", "variant=shape")
    for r = 0, 1 do
      local rep = got.reports[r]
      assert.is_false(rep.ok)
      assert.matches("parameter 'transformer.wte.weight'", rep.err, 1, true)
      assert.matches("f32 [101, 32] on rank 0 but f32 [101, 48] on rank 1", rep.err, 1, true)
    end
  end)

  it("fails cleanly on every rank when the number of parameters differs", function()
    local got = run(2, "case=mismatch", "variant=count")
    for r = 0, 1 do
      assert.is_false(got.reports[r].ok)
      assert.matches("rank 0 has %d+ parameters but rank 1 has %d+", got.reports[r].err)
    end
  end)
end)

-- In this process: world size 1 (no MPI), where ddp must change nothing and check its arguments.
describe("fsdp.ddp on one rank", function()
  local fsdp = require "fsdp"
  local ddp = require "fsdp.parallel.ddp"

  local function tiny(seed) return fsdp.models.build(fsdp.models.tiny_config("gpt2"), {seed = seed or 5}) end
  local function ids()
    local t = fsdp.empty({2, 8}, {dtype = "i64"})
    local p = t:data_ptr("int64_t *")
    for i = 0, 15 do p[i] = (i * 37 + 11) % 101 end
    return t
  end
  local function grads(model)
    local out = {}
    for name, p in model:named_parameters() do
      local g = p.grad
      out[name] = g and ffi.string(g:data_ptr(), g:numel() * 4) or false
    end
    return out
  end

  it("returns the model itself and leaves its grads bit-identical", function()
    local plain, wrapped = tiny(), tiny()
    assert.equal(wrapped, ddp(wrapped))
    local x = ids()
    plain(x, {labels = x}).loss:backward()
    wrapped(x, {labels = x}).loss:backward()
    assert.same(grads(plain), grads(wrapped))
  end)

  it("rejects bad options, non-modules and a second wrap, naming them", function()
    assert.has_error(function() ddp(tiny(), {bucket_cap = 1}) end,
      "ddp: unknown option 'bucket_cap' (valid: bucket_cap_mb, mesh)")
    assert.has_error(function() ddp(tiny(), {bucket_cap_mb = -1}) end, "ddp: bucket_cap_mb must be a number >= 0, got -1")
    assert.has_error(function() ddp(tiny(), {bucket_cap_mb = "25"}) end, "ddp: bucket_cap_mb must be a number >= 0, got 25")
    assert.has_error(function() ddp(tiny(), {mesh = {}}) end, "ddp: mesh must be a mesh from fsdp.mesh, got table")
    assert.has_error(function() ddp(42) end, "ddp: expected a module, got number")
    local m = ddp(tiny())
    assert.has_error(function() ddp(m) end, "ddp: this model is already wrapped by ddp")
    assert.has_error(function() m:set_requires_gradient_sync(1) end, "set_requires_gradient_sync: expected a boolean, got number")
  end)

  it("uses 25 MB buckets by default, so the tiny model is one bucket holding every parameter", function()
    local m = ddp(tiny())
    local b = m.ddp.buckets()
    assert.equal(1, #b)
    assert.equal(#m:parameters(), #b[1])
    assert.equal(25, m.ddp.bucket_cap_mb)
  end)

  it("leaves parameters with requires_grad = false out, as torch", function()
    local m = tiny()
    m.transformer.wpe.weight.requires_grad = false
    ddp(m)
    for _, name in ipairs(m.ddp.names) do assert.are_not.equal("transformer.wpe.weight", name) end
    assert.equal(#m:parameters() - 1, #m.ddp.names)
  end)

  it("no_sync returns fn's results and restores the flag; set_requires_gradient_sync toggles it", function()
    local m = ddp(tiny())
    local a, b, c = m:no_sync(function(x) assert.is_false(m:requires_gradient_sync()); return x, nil, 3 end, 1)
    assert.same({1, nil, 3}, {a, b, c})
    assert.is_true(m:requires_gradient_sync())
    m:set_requires_gradient_sync(false)
    assert.is_false(m:requires_gradient_sync())
    m:no_sync(function() end)
    assert.is_false(m:requires_gradient_sync())   -- restored to what it was, not forced on
  end)

  it("holds many wrapped models at once (they share one end-of-backward hook)", function()
    local models = {}
    for i = 1, 40 do models[i] = ddp(tiny(i)) end   -- more than the engine's 16 hook slots
    local x = ids()
    models[40](x, {labels = x}).loss:backward()
    assert.is_not_nil(models[40].transformer.wte.weight.grad)
  end)
end)
