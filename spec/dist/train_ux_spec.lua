-- spec/dist/train_ux_spec.lua: what examples/train.lua shows and writes (issue 10: --help, the progress lines and
-- bar, --metrics, --eval-every, the non-finite guard), examples/plot.lua's PNG and examples/custom_plan.lua on 2
-- ranks. Tiny runs (1 layer, 32 embd, 32 tokens a window, a few steps); the values are checked against numbers
-- computed here another way: the learning rate from the warmup formula, MFU from the parameter count by hand,
-- the printed means from the per-step metrics, eval losses at 2 ranks against 1, a run with evaluation against
-- one without, the custom plan's units from its description.
local D = require "dist"
local cjson = require "cjson"

local TINY = {"--layers", "1", "--embd", "32", "--seq", "32", "--sample", "10"}
local function args(...)
  local out = {unpack(TINY)}
  for _, list in ipairs {...} do for _, a in ipairs(list) do out[#out + 1] = a end end
  return out
end
local function train(n, list, opts)
  opts = opts or {}
  return D.run(n, "examples/train.lua", list, {timeout = opts.timeout or 120, no_dir = true})
end
local function read_metrics(path)
  local rows = {}
  for line in io.lines(path) do rows[#rows + 1] = cjson.decode(line) end
  return rows
end
local function lines_of(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

-- Parameters of the tiny GPT-2, counted from its shapes: wte V x C, wpe T x C, per block 12 C^2 + 13 C (ln_1,
-- c_attn C x 3C + 3C, c_proj C x C + C, ln_2, c_fc C x 4C + 4C, c_proj 4C x C + C), ln_f 2C; lm_head is wte.
local V, C, T, L = 256, 32, 32, 1
local N = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
local FLOPS_PER_TOKEN = 6 * N + 6 * L * C * T     -- the bench's count

-- One run shared by several tests: 1 rank, 6 steps, a line every 2, evaluation every 3, metrics, --peak 40.
local main_run
local function main()
  if main_run then return main_run end
  local dir = D.tmpdir()
  local metrics = dir .. "/metrics.jsonl"
  local res = train(1, args {"--steps", "6", "--log", "2", "--eval-every", "3", "--metrics", metrics, "--peak", "40"})
  assert.equal(0, res.code, res.output)
  main_run = {res = res, metrics = metrics, rows = read_metrics(metrics), dir = dir}
  return main_run
end

describe("examples/train.lua --help", function()
  -- every option of the example, from its documentation (README, issue 10), and the defaults of the old parser
  local OPTIONS = {model = "gpt2", layers = "4", embd = "128", heads = "4", seq = "128", steps = true, time = true,
    ["stop-at"] = true, batch = "8", lr = "3e-3", ["min-lr"] = "3e-4", warmup = "10", wd = "0.1", clip = "1.0",
    seed = "1234", data = true, holdout = "0.1", ["eval-every"] = true, ["eval-batches"] = "4", plan = true,
    threads = true, ["save-every"] = true, ["save-dir"] = true, resume = true, export = true, log = "10",
    progress = "auto", metrics = true, peak = true, sample = "300", temperature = "0.8", prompt = true}

  it("lists every option with its default, once on 2 ranks, and exits 0 (-h alike)", function()
    local res = train(2, {"--help"})
    assert.equal(0, res.code, res.output)
    local help = res.stdout
    local _, usages = help:gsub("Usage: train.lua", "")
    assert.equal(1, usages, help)                     -- rank 0 alone prints
    -- an option's entry: its line "   --name ARG  description" and the continuation lines under it
    local entries, current = {}, nil
    for _, line in ipairs(lines_of(help)) do
      local name = line:match("^   %-%-([%w-]+)") or line:match("^   %-h, %-%-(help)")
      if name then current = name; entries[name] = line
      elseif current and line:match("^                         ") then entries[current] = entries[current] .. line
      else current = nil end
    end
    for name, default in pairs(OPTIONS) do
      local e = entries[name]
      assert.truthy(e, ("--%s is not in the help:\n%s"):format(name, help))
      local shown = e:match("%(default: ([^)]*)%)")
      assert.truthy(shown, ("--%s has no default in the help: %s"):format(name, e))
      if default ~= true then assert.equal(default, shown, e) end
    end
    assert.truthy(entries.help, help)
    assert.truthy(help:find("6 N + 6 L C T", 1, true), help)                  -- how MFU is computed
    assert.truthy(help:find("sgemm peak measured at startup", 1, true), help)
    local short = train(1, {"-h"})
    assert.equal(0, short.code, short.output)
    assert.equal(help, short.stdout)
  end)

  it("rejects unknown options and bad values, naming them", function()
    local res = train(1, {"--stepz", "3"})
    assert.equal(2, res.code, res.output)
    assert.truthy(res.stderr:find("unknown option '--stepz'", 1, true), res.stderr)
    res = train(1, {"--steps", "2.5"})
    assert.equal(2, res.code, res.output)
    assert.truthy(res.stderr:find("--steps expects an integer >= 1, got '2.5'", 1, true), res.stderr)
    res = train(1, {"--plan", "zero3"})
    assert.equal(2, res.code, res.output)
    assert.truthy(res.stderr:find("--plan must be auto, declared, ddp or none, got 'zero3'", 1, true), res.stderr)
    res = train(1, {"--save-every", "2"})
    assert.truthy(res.stderr:find("--save-every needs --save-dir DIR", 1, true), res.stderr)
  end)
end)

describe("examples/train.lua progress and metrics", function()
  local LINE = "^step +(%d+)  loss (%d+%.%d%d%d%d)  lr (%d%.%d%de[-+]%d%d)  norm (%d+%.%d%d%d)  +(%d+) tokens/s  "
               .. "MFU +(%d+%.%d%d)%%  mem +(%d+%.%d) MiB  (%d+%.%d) s  ETA (%d+:%d%d)$"
  local EVAL = "^step +(%d+)  eval loss (%d+%.%d%d%d%d)  %((%d+) held%-out windows, (%d+%.%d) s%)$"

  it("prints plain lines when stdout is not a terminal: the first step, every --log steps and the last", function()
    local m = main()
    local out = m.res.stdout
    assert.is_nil(out:find("\r", 1, true), out)                   -- no redrawing
    assert.is_nil(out:find("\27[", 1, true), out)
    local steps, evals = {}, {}
    for _, l in ipairs(lines_of(out)) do
      if l:match("^step ") then
        local s = {l:match(LINE)}
        local e = {l:match(EVAL)}
        assert.is_true(#s > 0 or #e > 0, "line format: " .. l)
        if #s > 0 then steps[#steps + 1] = s else evals[#evals + 1] = e end
      end
    end
    assert.same({"1", "2", "4", "6"}, {steps[1][1], steps[2][1], steps[3][1], steps[4][1]})
    assert.equal(4, #steps, out)
    -- each line's loss is the mean of the steps since the line before; its lr and norm are of its own step
    local rows = m.rows
    local since = {{1}, {2}, {3, 4}, {5, 6}}
    for i, s in ipairs(steps) do
      local sum = 0
      for _, k in ipairs(since[i]) do sum = sum + rows[k].loss end
      assert.is_true(math.abs(tonumber(s[2]) - sum / #since[i]) <= 0.5e-4 + 1e-12, s[2])   -- printed to 4 places
      local row = rows[tonumber(s[1])]
      assert.equal(("%.2e"):format(row.lr), s[3])
      assert.equal(("%.3f"):format(row.grad_norm), s[4])
    end
    -- evaluation after steps 3 and 6, on --eval-batches 4 global batches of 8 windows
    assert.equal(2, #evals, out)
    for i, e in ipairs(evals) do
      assert.equal(tostring(3 * i), e[1])
      assert.equal("32", e[3])
      assert.equal(("%.4f"):format(rows[3 * i].eval_loss), e[2])
    end
    -- the tail held out: 10% of the 34856 windows of 32 tokens of tinyshakespeare's 1115394 bytes
    local windows = math.floor(math.floor(1115394 / 32) * 0.1)
    assert.truthy(out:find(("the last %d windows of 32 tokens (%d tokens from token %d); training on %d tokens")
      :format(windows, windows * 32, 1115394 - windows * 32, 1115394 - windows * 32), 1, true), out)
  end)

  it("writes one JSON line per step with sane values (--metrics)", function()
    local rows = main().rows
    assert.equal(6, #rows)
    local KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_bytes", "mem_peak_bytes", "step_time",
                  "wall_time"}
    local wall = 0
    for s, r in ipairs(rows) do
      for _, k in ipairs(KEYS) do assert.equal("number", type(r[k]), ("step %d: %s"):format(s, k)) end
      assert.equal(s, r.step)
      assert.is_true(r.loss > 3 and r.loss < 6, tostring(r.loss))            -- from ln(256) = 5.55 down
      -- warmup: --warmup 10 capped at the 6 steps, so lr = 3e-3 * step / 6
      assert.is_true(math.abs(r.lr - 3e-3 * s / 6) <= 1e-15, tostring(r.lr))
      assert.is_true(r.grad_norm > 0 and r.grad_norm < 100, tostring(r.grad_norm))
      assert.is_true(r.tokens_per_s > 0, tostring(r.tokens_per_s))
      -- 8 x 32 tokens in step_time seconds
      assert.is_true(math.abs(r.tokens_per_s * r.step_time - 256) <= 1e-6, tostring(r.tokens_per_s))
      -- MFU = FLOPs per token x tokens/s / (--peak 40 GFLOP/s); relative 1e-12: two roundings of doubles
      local want = FLOPS_PER_TOKEN * r.tokens_per_s / 40e9
      assert.is_true(math.abs(r.mfu - want) <= 1e-12 * want, ("mfu %.17g, expected %.17g"):format(r.mfu, want))
      -- at least the f32 weights (4 N bytes), their gradients during the step
      assert.is_true(r.mem_bytes >= 4 * N and r.mem_peak_bytes >= r.mem_bytes + 4 * N, tostring(r.mem_peak_bytes))
      assert.is_true(r.wall_time > wall and r.step_time > 0 and r.step_time <= r.wall_time, tostring(r.wall_time))
      wall = r.wall_time
      if s % 3 == 0 then
        assert.is_true(r.eval_loss > 3 and r.eval_loss < 6, tostring(r.eval_loss))
      else
        assert.is_nil(r.eval_loss)
      end
    end
    assert.is_true(rows[6].loss < rows[1].loss - 0.2)
    assert.is_true(rows[6].eval_loss < rows[3].eval_loss)     -- it learns the held-out text too
  end)

  it("measures the sgemm peak when --peak is not given, and MFU is against it", function()
    local dir = D.tmpdir()
    local res = train(1, args {"--steps", "2", "--metrics", dir .. "/m.jsonl"})
    assert.equal(0, res.code, res.output)
    local peak = tonumber(res.stdout:match("MFU against the measured sgemm peak: (%d+%.%d) GFLOP/s %(1 rank x %d+ threads%)"))
    assert.truthy(peak, res.stdout)
    assert.is_true(peak > 1 and peak < 1e5, res.stdout)
    for _, r in ipairs(read_metrics(dir .. "/m.jsonl")) do
      local want = FLOPS_PER_TOKEN * r.tokens_per_s / (peak * 1e9)
      assert.is_true(math.abs(r.mfu - want) <= 1e-3 * want, ("mfu %g, from the printed peak %g"):format(r.mfu, want))
      assert.is_true(r.mfu > 0 and r.mfu < 1, tostring(r.mfu))
    end
    D.cleanup(dir)
  end)

  -- The terminal: `script` gives the launcher a pty; the ranks' stdout is mpirun's pty either way, so they go by
  -- the launcher's FSDP_STDOUT_TTY. The same run without a terminal (and with evaluation) prints lines.
  local function on_terminal(n, list)
    local dir = D.tmpdir()
    local parts = {}
    for _, a in ipairs(list) do parts[#parts + 1] = D.quote(a) end
    local inner = ("%s -n %d examples/train.lua %s"):format(D.quote(D.exe), n, table.concat(parts, " "))
    local unset = (os.getenv("FSDP_SANITIZE") or "") ~= "" and "-u LD_PRELOAD" or ""
    local lua_path = D.root .. "lua/?.lua;" .. D.root .. "lua/?/init.lua;;"
    os.execute(("cd %s && env -u OMP_NUM_THREADS %s LUA_PATH=%s timeout -k 5 120 script -qec %s /dev/null > %s 2>&1 "
                .. "< /dev/null; echo $? > %s"):format(D.quote(D.root), unset, D.quote(lua_path), D.quote(inner),
                D.quote(dir .. "/out"), D.quote(dir .. "/rc")))
    local res = {code = tonumber((D.read_file(dir .. "/rc") or ""):match("%d+")), output = D.read_file(dir .. "/out") or ""}
    return res, dir
  end

  it("redraws a bar in place on a terminal (2 ranks); evaluating changes no training loss", function()
    local dir = D.tmpdir()
    local common = {"--steps", "6", "--batch", "4", "--peak", "40"}
    local tty, tdir = on_terminal(2, args(common, {"--metrics", dir .. "/tty.jsonl"}))
    assert.equal(0, tty.code, tty.output)
    local out = tty.output
    for s = 1, 6 do
      assert.truthy(out:find(("\rstep %d/6 %%[[#.]+%%] +%d%%%%  loss %%d%%.%%d%%d%%d%%d  "):format(s, math.floor(100 * s / 6))),
                    out)
    end
    assert.truthy(out:find("\rstep 6/6 [############] 100%", 1, true), out)
    assert.truthy(out:find("ETA %d+:%d%d\27%[K"), out)
    assert.is_nil(out:find("\nstep +%d+  loss"), out)                   -- no plain lines
    -- the same 2-rank run without a terminal, evaluating every 2 steps: plain lines, and the same losses bit for
    -- bit (eval runs in eval mode under no_grad and draws nothing from the training's random streams)
    local plain = train(2, args(common, {"--eval-every", "2", "--metrics", dir .. "/plain.jsonl"}))
    assert.equal(0, plain.code, plain.output)
    assert.truthy(plain.stdout:find("\nstep +6  loss"), plain.stdout)
    local a, b = read_metrics(dir .. "/tty.jsonl"), read_metrics(dir .. "/plain.jsonl")
    assert.equal(6, #a); assert.equal(6, #b)
    for s = 1, 6 do
      assert.equal(a[s].loss, b[s].loss)
      assert.equal(a[s].grad_norm, b[s].grad_norm)
      assert.equal(s % 2 == 0, b[s].eval_loss ~= nil)
    end
    -- eval at 2 ranks x 4 windows = the same 32 held-out windows as 1 rank x 8 (the shared run, --eval-every 3):
    -- the mean of the ranks' means is the mean over all; after 6 steps the weights differ only by the
    -- gradient reduction order (relative 1e-7), so the losses agree far inside 1e-4
    local m = main()
    assert.is_true(math.abs(b[6].eval_loss - m.rows[6].eval_loss) < 1e-4,
                   ("eval loss %.8f at 2 ranks, %.8f at 1"):format(b[6].eval_loss, m.rows[6].eval_loss))
    for s = 1, 6 do assert.is_true(math.abs(b[s].loss - m.rows[s].loss) < 1e-4) end
    D.cleanup(dir); D.cleanup(tdir)
  end)
end)

describe("examples/train.lua non-finite guard", function()
  it("stops every rank at the first nan or inf, naming the step, the loss and the last good checkpoint", function()
    local dir = D.tmpdir()
    local ckpt = dir .. "/ckpt"
    -- --lr 1e3 blows the weights up within a few steps (AdamW moves each by ~lr a step)
    local res = train(2, args {"--steps", "40", "--batch", "4", "--lr", "1e3", "--peak", "40", "--save-every", "4",
                               "--save-dir", ckpt, "--metrics", dir .. "/m.jsonl"})
    assert.equal(1, res.code, res.output)
    local _, count = res.stderr:gsub("train%.lua: stopped at step", "")
    assert.equal(1, count, res.stderr)                                     -- rank 0 says it, once
    local k, loss, norm, where = res.stderr:match(
      "train%.lua: stopped at step (%d+): loss (%S+), gradient norm (%S+) %(not finite%), before the optimizer step; ([^\n]+)")
    assert.truthy(k, res.stderr)
    k = tonumber(k)
    local function is_finite(x) x = tonumber(x); return x ~= nil and x == x and math.abs(x) ~= math.huge end
    assert.is_false(is_finite(loss) and is_finite(norm), res.stderr)
    assert.is_nil(res.stdout:find(("\nstep +%d  loss"):format(k)), res.stdout)   -- the bad step is not reported
    -- the metrics hold the good steps only
    local rows = read_metrics(dir .. "/m.jsonl")
    assert.equal(k - 1, #rows)
    for s, r in ipairs(rows) do assert.equal(s, r.step); assert.is_true(is_finite(r.loss)) end
    -- the checkpoint is the one of the last multiple of 4 before step k; it is good unless it is of step k-1 and
    -- its weights gave the non-finite loss
    local s = 4 * math.floor((k - 1) / 4)
    assert.is_true(s >= 4, "the run should blow up after step 4, not at step " .. k)
    if s < k - 1 or is_finite(loss) then
      assert.equal(("last good checkpoint: %s (step %d; --resume %s continues from it)"):format(ckpt, s, ckpt), where)
    else
      assert.equal(("no good checkpoint: %s holds step %d, whose weights gave this loss"):format(ckpt, s), where)
    end
    local meta = cjson.decode(D.read_file(ckpt .. "/metadata.json"))
    assert.equal(s, meta.step)
    D.cleanup(dir)
  end)

  it("says when no checkpoint was saved", function()
    local res = train(1, args {"--steps", "40", "--lr", "1e9", "--peak", "40"})
    assert.equal(1, res.code, res.output)
    assert.truthy(res.stderr:find("; no checkpoint was saved (--save-every N --save-dir DIR saves them)", 1, true),
                  res.stderr)
  end)
end)

describe("examples/plot.lua", function()
  local function plot(list) return D.run(1, "examples/plot.lua", list, {timeout = 60, no_dir = true}) end

  it("draws the metrics into a PNG", function()
    local m = main()
    local png = m.dir .. "/loss.png"
    local res = plot {m.metrics, png}
    assert.equal(0, res.code, res.output)
    assert.truthy(res.stdout:find("6 steps, 2 eval losses", 1, true), res.stdout)
    local bytes = D.read_file(png)
    assert.truthy(bytes, "no " .. png)
    assert.equal("\137PNG\r\n\26\n", bytes:sub(1, 8))                   -- the PNG signature
    assert.equal("IHDR", bytes:sub(13, 16))
    local function be32(i) local a, b, c, d = bytes:byte(i, i + 3); return ((a * 256 + b) * 256 + c) * 256 + d end
    assert.equal(900, be32(17)); assert.equal(960, be32(21))             -- the size plot.lua asks for
    assert.is_true(#bytes > 10000, "a PNG of " .. #bytes .. " bytes holds no plot")   -- three panels of lines
  end)

  it("says so when the metrics file is missing or empty", function()
    local dir = D.tmpdir()
    local res = plot {dir .. "/none.jsonl", dir .. "/x.png"}
    assert.equal(1, res.code, res.output)
    assert.truthy(res.stderr:find("plot.lua: cannot open " .. dir .. "/none.jsonl: No such file", 1, true), res.stderr)
    local f = io.open(dir .. "/empty.jsonl", "w"); f:close()
    res = plot {dir .. "/empty.jsonl", dir .. "/x.png"}
    assert.equal(1, res.code, res.output)
    assert.truthy(res.stderr:find("'" .. dir .. "/empty.jsonl' is empty: no metrics to plot", 1, true), res.stderr)
    assert.is_nil(D.read_file(dir .. "/x.png"))
    D.cleanup(dir)
  end)
end)

describe("examples/custom_plan.lua", function()
  local function losses(out)
    local t = {}
    for s, l in out:gmatch("\nstep (%d+)  loss (%d+%.%d+)") do t[tonumber(s)] = tonumber(l) end
    return t
  end

  it("prints the explain table of its plan and trains on 2 ranks as on 1", function()
    local two = D.run(2, "examples/custom_plan.lua", {}, {timeout = 120, no_dir = true})
    assert.equal(0, two.code, two.output)
    local out = two.stdout
    -- the plan as described: embeddings free, each MLP a bf16 unit, the last two of the 4 blocks (and their MLPs)
    -- kept, the root (ln_f; lm_head is wte) last
    local MP = ", mp {param_dtype=bf16, reduce_dtype=f32, output_dtype=f32}"
    local want = {"transformer.wte  [free_full_weight]", "transformer.wpe  [free_full_weight]"}
    for b = 0, 3 do
      local policy = b >= 2 and "keep_full_weight" or "free_full_weight"
      want[#want + 1] = ("transformer.h.%d.mlp  [%s%s]"):format(b, policy, MP)
      want[#want + 1] = ("transformer.h.%d  [%s]"):format(b, policy)
    end
    want[#want + 1] = "root (rest of the model)  [keep_full_weight]"
    local got = {}
    for i, rest in out:gmatch("\nunit (%d+)  ([^\n]+)") do got[tonumber(i)] = rest end
    assert.same(want, got)
    assert.truthy(out:find("FSDP plan: 11 units over 2 ranks", 1, true), out)
    assert.truthy(out:find("\n  also used by: lm_head\n", 1, true), out)       -- the tied head
    -- each rank holds half of the model: 4 blocks of 12 C^2 + 13 C, wte 256 C, wpe 64 C, ln_f 2 C at C = 64
    local n = 4 * (12 * 64 * 64 + 13 * 64) + 256 * 64 + 64 * 64 + 2 * 64
    assert.truthy(out:find(("rank 0 holds %d parameter elements in 11 units"):format(n / 2), 1, true), out)
    local l2 = losses(out)
    assert.equal(8, #l2, out)
    assert.is_true(l2[1] > 5.3 and l2[8] < l2[1] - 1, out)
    -- one process, the same global batch of 8: the same plan and windows; the f32 weights differ by the
    -- gradient reduction order (relative 1e-7), which can flip a weight's bf16 rounding in the MLPs (one bf16
    -- ulp, 2^-8 relative): measured 3e-5 apart after 8 steps, so 5e-4 is a tenth of a step's progress
    local one = D.run(1, "examples/custom_plan.lua", {}, {timeout = 120, no_dir = true})
    assert.equal(0, one.code, one.output)
    assert.truthy(one.stdout:find("FSDP plan: 11 units over 1 rank,", 1, true), one.stdout)
    local l1 = losses(one.stdout)
    for s = 1, 8 do
      assert.is_true(math.abs(l1[s] - l2[s]) < 5e-4, ("step %d: %.6f on 1 rank, %.6f on 2"):format(s, l1[s], l2[s]))
    end
  end)
end)

teardown(function() if main_run then D.cleanup(main_run.dir) end end)
