-- spec/workers/launch_env_worker.lua: writes what the launcher gave this rank (environment, thread count,
-- arguments, world) so that spec/dist/launcher_spec.lua can check it. Usage: fsdp-lua [-n N] launch_env_worker.lua DIR ...
local fsdp = require "fsdp"
local D    = require "dist"

fsdp.init{}
local args = {}
for i = 2, #arg do args[#args + 1] = arg[i] end
D.write(arg[1], fsdp.rank(), {
  rank = fsdp.rank(), world = fsdp.world_size(),
  omp = os.getenv("OMP_NUM_THREADS") or false, threads = fsdp.get_num_threads(),
  lua_path = os.getenv("FSDP_LUA_PATH") or false, mpi = os.getenv("OMPI_COMM_WORLD_SIZE") or false,
  arg0 = arg[0], args = args, nvarargs = select("#", ...),
  from_e = rawget(_G, "from_e") or false,   -- set by a -e statement when the spec passes one
})
