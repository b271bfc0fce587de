-- spec/alloc_cache_spec.lua: the caching host allocator (engine/core/storage.c): a training step in steady state
-- takes no large block from the system, freed blocks are kept and reused (split for smaller tensors, merged again
-- when freed), empty_cache gives wholly free segments back, and the accounting counts tensors, not the cache.
local fsdp = require "fsdp"
local C    = fsdp.C

local ON = C.fl_mem_cache_enabled()   -- off in the sanitizer build (make check): then nothing is ever cached

describe("the caching allocator", function()
  if not ON then
    it("is off in this build: freed blocks go straight back, nothing is cached", function()
      local t = fsdp.zeros({512, 1024})
      t:free()
      assert.equal(0, tonumber(C.fl_mem_cached()))
      local f0 = tonumber(C.fl_mem_fresh_bytes())
      fsdp.zeros({512, 1024}):free()
      assert.equal(f0 + 2 * 2 ^ 20, tonumber(C.fl_mem_fresh_bytes()))
    end)
    return
  end

  it("serves steady-state training steps from its cache: no fresh large blocks after the second step", function()
    local cfg = fsdp.models.tiny_config("llama", {hidden_size = 128, intermediate_size = 320, num_attention_heads = 4,
                                                  num_key_value_heads = 2, head_dim = 32, vocab_size = 4096})
    local model = fsdp.models.build(cfg, {seed = 1})
    local opt = fsdp.optim.AdamW(model:parameters(), {lr = 1e-3})
    local ids = fsdp.tensor((function()
      local r = {}
      for b = 1, 4 do r[b] = {}; for t = 1, 64 do r[b][t] = (b * 131 + t * 17) % 4096 end end
      return r
    end)(), {dtype = "i64"})
    local fresh = {}
    for step = 1, 5 do
      local out = model(ids, {labels = ids})
      out.loss:backward()
      opt:step(); opt:zero_grad()
      out.loss:free()
      collectgarbage(); collectgarbage()
      fresh[step] = tonumber(C.fl_mem_fresh_bytes())
    end
    assert.is_true(fresh[1] > 0)
    assert.equal(fresh[2], fresh[5], ("steps 3-5 took %d fresh bytes"):format(fresh[5] - fresh[2]))
    assert.is_true(tonumber(C.fl_mem_cached()) > 0)
  end)

  it("reuses a freed block for the same size, counts it as cached, and gives everything back on empty_cache", function()
    fsdp.empty_cache()
    assert.equal(0, tonumber(C.fl_mem_cached()))
    local before = tonumber(C.fl_mem_total_current())
    local t = fsdp.zeros({512, 1024})          -- 2 MiB
    local fresh0 = tonumber(C.fl_mem_fresh_bytes())
    t:free()
    assert.equal(before, tonumber(C.fl_mem_total_current()))   -- accounting follows tensors
    assert.equal(2 * 2 ^ 20, tonumber(C.fl_mem_cached()))
    local u = fsdp.zeros({512, 1000})          -- 2.3% smaller: the same block serves it
    assert.equal(fresh0, tonumber(C.fl_mem_fresh_bytes()))
    assert.equal(0, tonumber(C.fl_mem_cached()))
    assert.equal(0, fsdp.F.sum_squares(u))     -- zeros is zeros, whatever the block held
    u:free()
    assert.is_true(fsdp.memory_stats().cached >= 2 * 2 ^ 20)
    assert.matches("cached", tostring(fsdp.memory_stats()))
    fsdp.empty_cache()
    assert.equal(0, tonumber(C.fl_mem_cached()))
    local v = fsdp.zeros({512, 1024})          -- after empty_cache the same size comes from the system again
    assert.equal(fresh0 + 2 * 2 ^ 20, tonumber(C.fl_mem_fresh_bytes()))
    v:free()
  end)

  it("splits a cached block for smaller tensors and merges the pieces back when they are freed", function()
    collectgarbage(); collectgarbage()
    fsdp.empty_cache()
    local MiB = 2 ^ 20
    local big = fsdp.zeros({2 * MiB})            -- 8 MiB: one segment of its own
    local fresh0, cached0 = tonumber(C.fl_mem_fresh_bytes()), tonumber(C.fl_mem_cached())
    big:free()
    assert.equal(cached0 + 8 * MiB, tonumber(C.fl_mem_cached()))
    -- two 3 MiB tensors come out of the 8 MiB block: no fresh bytes, 2 MiB stay cached
    local a, b = fsdp.zeros({768 * 1024}), fsdp.zeros({768 * 1024})
    assert.equal(fresh0, tonumber(C.fl_mem_fresh_bytes()))
    assert.equal(cached0 + 2 * MiB, tonumber(C.fl_mem_cached()))
    assert.equal(0, fsdp.F.sum_squares(a) + fsdp.F.sum_squares(b))
    -- while a piece is alive its segment stays: empty_cache keeps the free rest
    a:free()
    fsdp.empty_cache()
    assert.equal(cached0 + 5 * MiB, tonumber(C.fl_mem_cached()))
    -- freed, the pieces merge into the whole 8 MiB again: an 8 MiB tensor takes it, nothing fresh
    b:free()
    local again = fsdp.zeros({2 * MiB})
    assert.equal(fresh0, tonumber(C.fl_mem_fresh_bytes()))
    again:free()
    fsdp.empty_cache()
    assert.equal(cached0, tonumber(C.fl_mem_cached()))
  end)

  it("is off with FSDP_CACHE_LIMIT_MB=0", function()
    local p = io.popen([[FSDP_CACHE_LIMIT_MB=0 build/fsdp-lua -e 'local fsdp = require "fsdp"
      fsdp.zeros({512, 1024}):free(); print(fsdp.C.fl_mem_cache_enabled(), tonumber(fsdp.C.fl_mem_cached()))' 2>&1]])
    local out = p:read("*a")
    p:close()
    assert.equal("false\t0\n", out)
  end)
end)
