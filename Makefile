# fsdp-lua build. `make` builds build/fsdp-lua and build/libfsdp.so; `make test`, `make check`, `make demo`,
# `make bench`, `make bench-scale`.
# `make CUDA=1` also compiles kernels/ with nvcc and links cuBLAS.
CC      ?= gcc
BUILD   := build
# lua-argparse (examples/train.lua's options) is /usr/share/lua/5.1/argparse.lua, on LuaJIT's default package.path,
# which fsdp-lua keeps after its own lua/; gnuplot-nox draws examples/plot.lua's PNGs.
DEB_PKGS := luajit libluajit-5.1-dev lua-cjson lua-busted libopenblas-openmp-dev libopenmpi-dev openmpi-bin libedit-dev \
            lua-argparse gnuplot-nox
BLAS_INC := /usr/include/x86_64-linux-gnu/openblas-openmp
CFLAGS  ?= -O3 -march=native
# SANITIZE=address,undefined builds with those sanitizers (make check's sanitizer build, in its own BUILD dir).
SANITIZE ?=
SAN_OPT ?= -O1
ifneq ($(SANITIZE),)
CFLAGS  += $(SAN_OPT) -g -fno-omit-frame-pointer -fsanitize=$(SANITIZE) -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=$(SANITIZE)
endif
# -fno-math-errno: nothing reads errno after libm, and without it sqrtf is a call that blocks vectorisation
# (the results are the same: IEEE sqrt is correctly rounded either way).
CFLAGS  += -std=c11 -D_GNU_SOURCE -fPIC -fopenmp -fno-math-errno -Wall -Wextra -Wno-unused-parameter -Iengine -Ikernels -I$(BLAS_INC) \
           $(shell pkg-config --cflags luajit 2>/dev/null)
MPI_CFLAGS := $(shell mpicc --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell mpicc --showme:link 2>/dev/null)
CFLAGS  += $(MPI_CFLAGS)
LDLIBS  := $(MPI_LIBS) -lopenblas -lm -lpthread
LUAJIT_LIBS := $(shell pkg-config --libs luajit 2>/dev/null || echo -lluajit-5.1)

# engine/ is one folder per layer: core (tensors, storage, autograd), ops, dist (communication, DDP, FSDP), io,
# cli (the executable's main). Objects mirror the folders under $(BUILD)/obj; every header is a dependency.
ENGINE_SRC := $(filter-out engine/cli/main.c,$(wildcard engine/*/*.c))
ENGINE_OBJ := $(patsubst engine/%.c,$(BUILD)/obj/%.o,$(ENGINE_SRC))
ENGINE_HDR := $(wildcard engine/*.h engine/*/*.h)
CDEF := lua/fsdp/_cdef.lua

ifeq ($(CUDA),1)
NVCC    ?= nvcc
CUDA_HOME ?= /usr/local/cuda
KERNEL_SRC := $(wildcard kernels/*.cu)
KERNEL_OBJ := $(patsubst kernels/%.cu,$(BUILD)/cuda/%.o,$(KERNEL_SRC))
CFLAGS  += -DFL_WITH_CUDA=1 -I$(CUDA_HOME)/include
LDLIBS  += -L$(CUDA_HOME)/lib64 -lcudart -lcublas -lstdc++  # nvcc host code needs the C++ runtime
NVFLAGS ?= -O3 -arch=sm_90 -Xcompiler -fPIC -Iengine -Ikernels
endif

.PHONY: all binaries deps test test-reference check check-deps check-lua check-c check-asan demo bench bench-scale clean install
# deps first, then a fresh make: the compiler flags above ask mpicc and pkg-config, which deps installs.
all: deps
	@$(MAKE) --no-print-directory binaries
binaries: $(BUILD)/fsdp-lua $(BUILD)/libfsdp.so $(CDEF)

# Installs the Debian packages the project needs, only those missing (apt-get update once first).
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

$(BUILD)/obj/%.o: engine/%.c $(ENGINE_HDR) $(wildcard kernels/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/cuda/%.o: kernels/%.cu $(wildcard kernels/*.h) engine/fsdp.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(BUILD)/libfsdp.so: $(ENGINE_OBJ) $(KERNEL_OBJ) Makefile
	$(CC) $(LDFLAGS) -shared -fopenmp -Wl,-z,nodelete -o $@ $(filter %.o,$^) $(LDLIBS)  # nodelete: OpenMP threads outlive dlclose at exit

# The executable exports the engine's symbols so that ffi.C finds them.
$(BUILD)/fsdp-lua: $(BUILD)/obj/cli/main.o $(ENGINE_OBJ) $(KERNEL_OBJ)
	$(CC) $(LDFLAGS) -fopenmp -Wl,--export-dynamic -o $@ $^ $(LUAJIT_LIBS) -ledit $(LDLIBS)

$(BUILD)/obj/cli/main.o: engine/cli/main.c engine/fsdp.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DFL_LUA_DIR='"$(abspath lua)"' -c $< -o $@

# The FFI declarations are the preprocessed public header: Lua and C cannot drift.
$(CDEF): engine/fsdp.h
	@mkdir -p $(dir $@)
	@{ echo "-- Generated from engine/fsdp.h by the Makefile. Do not edit."; echo "return [==["; \
	   $(CC) -E -P -DFL_FFI engine/fsdp.h | grep -v '^\s*$$'; echo "]==]"; } > $@.tmp && mv $@.tmp $@

test: all
	@CI=$(CI) spec/run.sh

# make test-reference: the live interop check with transformers, both directions (spec/reference/check_interop.py);
# needs the reference venv (bash spec/reference/setup_venv.sh) and is skipped, counting nothing, without it.
REF_PY := spec/reference/.venv/bin/python
test-reference: all
	@if [ -x $(REF_PY) ]; then $(REF_PY) spec/reference/check_interop.py; \
	else echo "test-reference: skipped (no spec/reference/.venv; run bash spec/reference/setup_venv.sh)"; fi

# make check: the checks that must stay clean, each failing on any finding. luacheck reads .luacheckrc;
# cppcheck sees the build's include paths; then every spec (C, busted, multi-rank) against an ASan + UBSan build
# in build-asan (spec/run.sh says how the sanitizer runtime is loaded). About 3 minutes on 2 cores.
CHECK_PKGS := lua-check cppcheck
CPPCHECK_FLAGS := --enable=warning,performance,portability --inline-suppr --error-exitcode=1 --std=c11 --quiet \
                  -D_GNU_SOURCE -Iengine -Ikernels -I$(BLAS_INC) $(filter -I%,$(MPI_CFLAGS)) \
                  --template='{file}:{line}: {severity}: {message} [{id}]'
check: check-lua check-c check-asan
	@echo "make check: luacheck, cppcheck and the sanitizer specs are clean"

check-deps:
	@$(MAKE) --no-print-directory deps DEB_PKGS="$(CHECK_PKGS)"

check-lua: check-deps
	luacheck --no-color --codes --formatter plain lua/ examples/

check-c: check-deps
	cppcheck $(CPPCHECK_FLAGS) engine/ $(wildcard kernels/*.h)

check-asan: deps
	@$(MAKE) --no-print-directory BUILD=build-asan SANITIZE=address,undefined binaries
	@FSDP_BUILD=build-asan FSDP_SANITIZE=address,undefined spec/run.sh

demo: all
	$(BUILD)/fsdp-lua examples/train.lua --time 110

bench: all
	$(BUILD)/fsdp-lua spec/bench/bench.lua
	$(BUILD)/fsdp-lua spec/bench/bench_dist.lua --all
	$(BUILD)/fsdp-lua spec/bench/bench_ckpt.lua

# Real sizes (GPT-2 124M and 350M, a Llama-shaped 0.86B), ours and PyTorch's; about 40 minutes on 2 cores.
# BENCH_SCALE_ARGS="--sizes gpt2-256" runs a subset (spec/bench/README.md).
bench-scale: all
	$(BUILD)/fsdp-lua spec/bench/bench_scale.lua $(BENCH_SCALE_ARGS)

PREFIX ?= /usr/local
install: all
	install -d $(PREFIX)/bin $(PREFIX)/share/fsdp-lua
	cp -r lua $(PREFIX)/share/fsdp-lua/
	install -m 755 $(BUILD)/fsdp-lua $(PREFIX)/bin/fsdp-lua

clean:
	rm -rf $(BUILD) build-asan $(CDEF)
