-- spec/dist/mesh_spec.lua: device meshes on 4 real ranks (spec/workers/mesh_worker.lua): row-major layouts as
-- torch.init_device_mesh, submesh memberships computed here by hand, flattening, collectives over dims, errors.
local D = require "dist"   -- spec/support/dist.lua

local ranks
local function run()
  if not ranks then
    local res = D.run(4, "spec/workers/mesh_worker.lua", {}, {timeout = 60})
    assert(res.code == 0, ("mesh_worker exited %d:\n%s"):format(res.code, res.output))
    ranks = D.results(res, 4)
    D.cleanup(res)
  end
  return ranks
end

local function div(a, b) return math.floor(a / b) end

describe("fsdp.mesh on 4 ranks", function()
  it("lays out {dp_replicate = 2, dp_shard = 2} row-major, whatever the table's key order", function()
    for g1, got in ipairs(run()) do
      local g = g1 - 1
      local m = got.hsdp
      assert.same({"dp_replicate", "dp_shard"}, m.names)
      assert.same({2, 2}, m.shape)
      assert.equal(4, m.size)
      assert.same({div(g, 2), g % 2}, m.coordinate)      -- rank = 2 * replicate + shard
      assert.equal(g % 2, m.coord_shard)
      assert.equal(2, m.size_shard)
      -- dp_shard: the ranks sharing this replicate index; dp_replicate: those sharing this shard index
      assert.same({ranks = {2 * div(g, 2), 2 * div(g, 2) + 1}, rank = g % 2, size = 2, group = "dp_shard"}, m.subs.dp_shard)
      assert.same({ranks = {g % 2, g % 2 + 2}, rank = div(g, 2), size = 2, group = "dp_replicate"}, m.subs.dp_replicate)
    end
  end)

  it("runs collectives over a mesh dim within its group only", function()
    for g1, got in ipairs(run()) do
      local g = g1 - 1
      local s0 = 2 * div(g, 2)
      assert.equal(s0 + s0 + 1, got.sum_shard)             -- {0,1} -> 1, {2,3} -> 5
      assert.equal((g % 2) + (g % 2 + 2), got.sum_replicate) -- {0,2} -> 2, {1,3} -> 4
      assert.same({g % 2, g % 2 + 2}, got.gather_replicate)
    end
  end)

  it("flattens dims into a named 1-D mesh over all their ranks", function()
    for g1, got in ipairs(run()) do
      assert.same({ranks = {0, 1, 2, 3}, rank = g1 - 1, same = true, names = {"dp"}}, got.flat)
      assert.equal(6, got.sum_flat)
      assert.same({0, 1, 2, 3}, got.three_flat)   -- a and c around a size-1 dim b
    end
  end)

  it("keeps the array form's order and orders the table form canonically", function()
    for g1, got in ipairs(run()) do
      local g = g1 - 1
      local m = got.swapped   -- {{"dp_shard", 2}, {"dp_replicate", 2}}: dp_shard is the outer dim now
      assert.same({"dp_shard", "dp_replicate"}, m.names)
      assert.same({div(g, 2), g % 2}, m.coordinate)
      assert.same({g % 2, g % 2 + 2}, m.subs.dp_shard.ranks)
      assert.same({2 * div(g, 2), 2 * div(g, 2) + 1}, m.subs.dp_replicate.ranks)
      assert.same({"dp_shard", "tp"}, got.order_known)
      assert.same({"alpha", "zeta"}, got.order_other)
      assert.same({"dp_replicate", "expert"}, got.order_mixed)
      assert.same({2, 2}, got.inferred)
      assert.same({shape = {4}, same = true, ranks = {0, 1, 2, 3}, group = "dp_shard"}, got.one_d)
      -- three dims (a = 2, b = 1, c = 2): rank = 2a + c
      local t = got.three
      assert.same({div(g, 2), 0, g % 2}, t.coordinate)
      assert.same({g % 2, g % 2 + 2}, t.subs.a.ranks)
      assert.same({g}, t.subs.b.ranks)
      assert.same({2 * div(g, 2), 2 * div(g, 2) + 1}, t.subs.c.ranks)
    end
  end)

  it("names the dims and the world size when the sizes are wrong, and rejects bad specs", function()
    local got = run()[1]
    assert.equal("mesh: dims dp_replicate=3 x dp_shard=2 make 6 ranks, but the world size is 4", got.err_product)
    assert.equal("mesh: cannot infer dim 'dp_shard': world size 4 is not divisible by the other dims (dp_replicate=3 = 3)", got.err_infer)
    assert.truthy(got.err_two_infer:find("both -1", 1, true), got.err_two_infer)
    assert.truthy(got.err_size:find("size of dim 'dp_shard' must be a positive integer or -1, got 0", 1, true), got.err_size)
    assert.truthy(got.err_mixed_forms:find("mixes the array form", 1, true), got.err_mixed_forms)
    assert.truthy(got.err_dup:find("dim 'dp_shard' appears twice", 1, true), got.err_dup)
    assert.truthy(got.err_method_name:find("'size' is also a Mesh method", 1, true), got.err_method_name)
    assert.truthy(got.err_empty:find("no dims given", 1, true), got.err_empty)
    assert.truthy(got.err_unknown_dim:find("mesh: no dim 'tp' (dims: dp, dp_replicate, dp_shard)", 1, true), got.err_unknown_dim)
    assert.truthy(got.err_nd_group:find("a 2-D mesh (dp_replicate, dp_shard) is not a group", 1, true), got.err_nd_group)
    assert.truthy(got.err_flatten_order:find("in mesh order", 1, true), got.err_flatten_order)
    assert.truthy(got.err_flatten_unknown:find("mesh has no dim 'cp'", 1, true), got.err_flatten_unknown)
    assert.truthy(got.err_flatten_taken:find("'dp' is already a dim of this mesh", 1, true), got.err_flatten_taken)
  end)
end)
