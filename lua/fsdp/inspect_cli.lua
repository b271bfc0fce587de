-- lua/fsdp/inspect_cli.lua: the script `fsdp-lua inspect PATH [--tensor NAME]` runs (engine/cli/main.c); the
-- exit status is inspect.main's (0 printed, 1 a malformed checkpoint, reported in one line, 2 a usage error).
os.exit(require("fsdp.inspect").main(...))
