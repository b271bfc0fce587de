#!/usr/bin/env bash
# Create spec/reference/.venv with the PyTorch + transformers versions used to make spec/fixtures/.
# Idempotent and quiet: does nothing when the venv already imports the pinned versions.
#
# Only PyPI is reachable here, and PyPI's Linux torch wheel is the CUDA build: its libtorch_cuda.so is a
# hard link-time dependency (libcufile, libcusparseLt, libnvshmem, libcudnn, ...), so
# `pip install --no-deps torch` fails at `import torch`. We therefore install torch with its normal
# dependencies (~5.6 GB on disk, ~2 min); everything then runs on the CPU.
#
# Overrides: PYTHON (interpreter, default python3), VENV (default spec/reference/.venv),
#            TORCH_SPEC, TRANSFORMERS_SPEC, SAFETENSORS_SPEC, NUMPY_SPEC (pip requirement strings).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.15.0}"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==5.24.0}"
SAFETENSORS_SPEC="${SAFETENSORS_SPEC:-safetensors==0.8.0}"
NUMPY_SPEC="${NUMPY_SPEC:-numpy>=1.26}"

want_torch="${TORCH_SPEC#torch==}"
want_tf="${TRANSFORMERS_SPEC#transformers==}"

venv_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$want_torch" "$want_tf" >/dev/null 2>&1 <<'EOF'
import sys
import numpy, safetensors, torch, transformers
want_torch, want_tf = sys.argv[1], sys.argv[2]
ok = True
if "=" not in want_torch and "<" not in want_torch and ">" not in want_torch:
    ok &= torch.__version__.split("+")[0] == want_torch
if "=" not in want_tf and "<" not in want_tf and ">" not in want_tf:
    ok &= transformers.__version__ == want_tf
x = torch.ones(2, 2, requires_grad=True)
(x @ x).sum().backward()
sys.exit(0 if ok else 1)
EOF
}

if venv_ok; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's python3 needs python3-venv for ensurepip
        rm -rf "$VENV"
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 || true
        fi
        "$PYTHON" -m venv "$VENV"
    fi
fi

echo "setup_venv: installing $TORCH_SPEC $TRANSFORMERS_SPEC $SAFETENSORS_SPEC $NUMPY_SPEC into $VENV (large download)" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "$TORCH_SPEC" "$TRANSFORMERS_SPEC" "$SAFETENSORS_SPEC" "$NUMPY_SPEC"

if ! venv_ok; then
    echo "setup_venv: venv at $VENV does not import the pinned torch/transformers" >&2
    "$VENV/bin/python" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' >&2 || true
    exit 1
fi
