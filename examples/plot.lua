-- examples/plot.lua: draws what `train.lua --metrics FILE` wrote (one JSON object per step) into a PNG with gnuplot:
-- the training loss with the held-out eval loss, the learning rate and tokens/s, one panel each, against the step.
--     build/fsdp-lua examples/train.lua --steps 200 --eval-every 20 --metrics out/metrics.jsonl
--     build/fsdp-lua examples/plot.lua out/metrics.jsonl out/loss.png
-- Needs gnuplot (Debian's gnuplot-nox; `make deps` installs it). Steps whose value is null (not finite) are gaps.
local cjson = require "cjson"

local function fail(fmt, ...)
  io.stderr:write("plot.lua: ", fmt:format(...), "\n")
  os.exit(1)
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end   -- for the shell
local function gq(s) return "'" .. tostring(s):gsub("'", "''") .. "'" end     -- for gnuplot

-- The metrics as rows {step, loss, lr, tokens_per_s, eval_loss}; nil where a line has null or lacks the key.
local function read_metrics(path)
  local f, err = io.open(path, "rb")
  if not f then fail("cannot open %s", err) end   -- err is "PATH: reason"
  local rows, n = {}, 0
  for line in f:lines() do
    n = n + 1
    if line:match("%S") then
      local ok, row = pcall(cjson.decode, line)
      if not ok or type(row) ~= "table" then
        fail("%s:%d is not a JSON object: %s", path, n, ok and line:sub(1, 60) or tostring(row))
      end
      local function num(k)
        local v = row[k]
        if v ~= nil and v ~= cjson.null and type(v) ~= "number" then
          fail("%s:%d: %s is %s, expected a number", path, n, k, type(v))
        end
        return type(v) == "number" and v or nil
      end
      local step = num("step")
      if not step then fail("%s:%d has no step (is it train.lua's --metrics output?)", path, n) end
      rows[#rows + 1] = {step = step, loss = num("loss"), lr = num("lr"), tokens_per_s = num("tokens_per_s"),
                         eval_loss = num("eval_loss")}
    end
  end
  f:close()
  if #rows == 0 then
    fail("'%s' is empty: no metrics to plot (train.lua --metrics FILE writes one JSON line per step)", path)
  end
  return rows
end

-- The first PNG terminal this gnuplot has: pngcairo (antialiased) or libgd's png.
local function png_terminal()
  for _, t in ipairs {"pngcairo", "png"} do
    if os.execute(("gnuplot -e %s >/dev/null 2>&1"):format(q("set terminal " .. t))) == 0 then return t end
  end
  if os.execute("command -v gnuplot >/dev/null 2>&1") ~= 0 then
    fail("gnuplot is not installed (Debian: apt-get install gnuplot-nox, or `make deps`)")
  end
  fail("this gnuplot has no PNG terminal (pngcairo or png)")
end

local function main(argv)
  if #argv ~= 2 then
    fail("usage: build/fsdp-lua examples/plot.lua METRICS.jsonl OUT.png (got %d argument%s)", #argv,
         #argv == 1 and "" or "s")
  end
  local input, output = argv[1], argv[2]
  local rows = read_metrics(input)
  local term = png_terminal()
  local parent = output:match("^(.*)/[^/]*$")
  if parent and parent ~= "" then os.execute("mkdir -p " .. q(parent)) end

  local dir = os.tmpname()
  os.remove(dir)
  if os.execute("mkdir -p " .. q(dir)) ~= 0 then fail("cannot make a temporary directory %s", dir) end
  local function v(x) return x and ("%.17g"):format(x) or "NaN" end   -- NaN: gnuplot leaves a gap
  local train, evals = {}, {}
  for _, r in ipairs(rows) do
    train[#train + 1] = ("%s %s %s %s"):format(v(r.step), v(r.loss), v(r.lr), v(r.tokens_per_s))
    if r.eval_loss then evals[#evals + 1] = ("%s %s"):format(v(r.step), v(r.eval_loss)) end
  end
  local function write(name, lines)
    local path = dir .. "/" .. name
    local f = assert(io.open(path, "wb"))
    f:write(table.concat(lines, "\n"), "\n")
    f:close()
    return path
  end
  local train_dat = write("train.dat", train)
  local loss_plot = ("plot %s using 1:2 with lines linewidth 1.5 title 'train'"):format(gq(train_dat))
  if #evals > 0 then
    loss_plot = loss_plot .. (", %s using 1:2 with linespoints pointtype 7 linewidth 1.5 title 'eval (held out)'")
      :format(gq(write("eval.dat", evals)))
  end
  local script = write("plot.gp", {
    ("set terminal %s size 900,960"):format(term),
    ("set output %s"):format(gq(output)),
    ("set multiplot layout 3,1 title %s"):format(gq(input .. (" (%d steps)"):format(#rows))),
    "set grid", "set key top right", "set xlabel 'step'", "set lmargin 12",
    "set ylabel 'loss'", loss_plot,
    "set ylabel 'learning rate'", "set format y '%.1e'",
    ("plot %s using 1:3 with lines linewidth 1.5 notitle"):format(gq(train_dat)),
    "set ylabel 'tokens/s'", "set format y '%g'",
    ("plot %s using 1:4 with lines linewidth 1.5 notitle"):format(gq(train_dat)),
    "unset multiplot",
  })
  local errfile = dir .. "/stderr"
  local status = os.execute(("gnuplot %s 2>%s"):format(q(script), q(errfile)))
  local ef = io.open(errfile, "rb")
  local err = ef and ef:read("*a") or ""
  if ef then ef:close() end
  os.execute("rm -rf " .. q(dir))
  if status ~= 0 then fail("gnuplot failed on %s: %s", input, err ~= "" and err or ("status " .. tostring(status))) end
  local out = io.open(output, "rb")
  local size = out and out:seek("end") or 0
  if out then out:close() end
  if size == 0 then fail("gnuplot wrote no image to '%s': %s", output, err) end
  print(("plot.lua: %d steps%s from %s -> %s (%d bytes)"):format(#rows,
        #evals > 0 and (", %d eval losses"):format(#evals) or "", input, output, size))
end

main({...})
