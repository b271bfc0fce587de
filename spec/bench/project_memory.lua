-- spec/bench/project_memory.lua: memory per rank of Llama 2 7B and Llama 3.1 8B under FSDP at 8, 16 and 64 ranks,
-- projected from what this engine holds, beside torchtitan's published Llama 3.1 8B figure (82.4 GiB peak per
-- GPU on 8 H100s, FSDP, bf16 parameters with f32 reduction, selective activation checkpointing, local batch 2,
-- seq 8192). Runs in a few seconds on the CPU: build/fsdp-lua spec/bench/project_memory.lua
--
-- Two parts, each from a measurement or the engine's own accounting, never from a guess:
--   state     fsdp.explain(model, "auto", W) on a meta build: f32 parameter and gradient shards, AdamW's two
--             states, and the peak of gathered weights that replaying the engine's unshard / prefetch / reshard
--             schedule gives (spec/dist/explain_memory_spec.lua checks that replay against the allocator's
--             counters to the byte); with mixed_precision {param_dtype = "bf16"} the gathered weights are bf16.
--   activations  what autograd holds after the forward, measured here on a narrow twin of each model (hidden
--             1024, the same MLP ratio, head dim and share of kv heads) at 1 and 3 layers: the difference is the
--             bytes per token per layer, which scales with the width when those ratios are fixed (flash-style
--             attention keeps no T x T scores). Plus the fused LM head's saved gradients (dW [V, H] and dh [N, H], f32),
--             which live from the forward to the backward. With activation checkpointing on every block, a layer
--             keeps only its input ([N, H]) and one block's activations exist at a time, during its recompute.
-- Not counted: the reduce-scatter buffers during backward (one unit's gradient, transiently), the allocator's
-- free segments, and the runtime (MPI, BLAS, LuaJIT: ~200 MB a rank on this machine).
local fsdp = require "fsdp"
local F    = require "fsdp.parallel"

local GiB = 2 ^ 30

-- ---- activations: bytes per token per layer, measured ----

-- A narrow twin of cfg: hidden 1024 with the same MLP ratio, head dim and share of kv heads (so every saved tensor
-- is the same multiple of the width), vocabulary 512.
local NARROW = 1024
local function narrow(cfg, layers)
  local s = NARROW / cfg.hidden_size
  return fsdp.models.config("llama", {vocab_size = 512, hidden_size = NARROW,
    intermediate_size = math.floor(cfg.intermediate_size * s + 0.5), num_hidden_layers = layers,
    num_attention_heads = cfg.num_attention_heads * s, num_key_value_heads = math.max(1, cfg.num_key_value_heads * s),
    max_position_embeddings = 512, tie_word_embeddings = false})
end

local function held_after_forward(cfg, tokens)
  local model = fsdp.models.build(cfg, {seed = 1})
  local ids = fsdp.empty({1, tokens}, {dtype = "i64"})
  local p = ids:data_ptr("int64_t *")
  for j = 0, tokens - 1 do p[j] = (j * 7919) % 512 end
  collectgarbage(); collectgarbage()
  local before = F.memory_stats().activation.current
  local out = model(ids, {labels = ids})
  local held = F.memory_stats().activation.current - before
  out.loss:free()
  model = nil
  collectgarbage(); collectgarbage()
  return held
end

-- bytes per token per layer at cfg's width: the narrow twin at 3 layers minus at 1 (the head cancels), per token
-- and layer, times hidden / 1024
local TOKENS = 512
local function per_token_layer(cfg)
  local d = held_after_forward(narrow(cfg, 3), TOKENS) - held_after_forward(narrow(cfg, 1), TOKENS)
  return d / (2 * TOKENS) * cfg.hidden_size / NARROW
end

-- ---- the projection ----

local MODELS = {
  {name = "Llama 2 7B", cfg = {vocab_size = 32000, hidden_size = 4096, intermediate_size = 11008, num_hidden_layers = 32,
                               num_attention_heads = 32, num_key_value_heads = 32, max_position_embeddings = 8192,
                               tie_word_embeddings = false}},
  {name = "Llama 3.1 8B", cfg = {vocab_size = 128256, hidden_size = 4096, intermediate_size = 14336,
                                 num_hidden_layers = 32, num_attention_heads = 32, num_key_value_heads = 8,
                                 max_position_embeddings = 8192, tie_word_embeddings = false}},
}
local LOCAL_BATCH, SEQ = 2, 8192
local N = LOCAL_BATCH * SEQ

print(("local batch %d x seq %d = %d tokens a rank; AdamW; f32 master weights, gradients and states"):format(LOCAL_BATCH,
  SEQ, N))
for _, m in ipairs(MODELS) do
  m.config = fsdp.models.config("llama", m.cfg)
  m.per_tl = per_token_layer(m.config)
  print(("%s: activations %.0f KiB per token per layer (f32, measured on its hidden-1024 twin, scaled by %d/1024)")
    :format(m.name, m.per_tl / 1024, m.config.hidden_size))
end
print()
print(("%-13s %5s %-8s %8s %8s %8s %9s %9s %11s %11s"):format("model", "ranks", "weights", "param", "grad",
  "optim", "gathered", "state", "+act (AC)", "+act (none)"))
for _, m in ipairs(MODELS) do
  local cfg, per_tl = m.config, m.per_tl
  local H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
  local head = 4 * (V * H + N * H)                                    -- the fused head's saved dW and dh
  local act_none = L * N * per_tl + head
  local act_ac = L * N * H * 4 + N * per_tl + head                     -- block inputs + one block recomputed
  for _, W in ipairs {8, 16, 64} do
    for _, mp in ipairs {{label = "f32"}, {label = "bf16", mixed_precision = {param_dtype = "bf16"}}} do
      local model = fsdp.models.build(cfg, {device = "meta"})
      local e = F.explain(model, "auto", W, {mixed_precision = mp.mixed_precision}).memory[0]
      print(("%-13s %5d %-8s %7.2fG %7.2fG %7.2fG %8.2fG %8.2fG %10.1fG %10.1fG"):format(m.name, W, mp.label,
        e.param / GiB, e.grad / GiB, e.optim / GiB, e.param_unsharded / GiB, e.total / GiB,
        (e.total + act_ac) / GiB, (e.total + act_none) / GiB))
    end
  end
end
print()
print("torchtitan, Llama 3.1 8B, 8 H100s, FSDP, bf16 params / f32 reduce, selective AC, local batch 2, seq 8192: 82.4 GiB peak")
