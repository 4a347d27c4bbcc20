#!/usr/bin/env bash
# One-time (idempotent) set-up of .venv/ for tiersched on a CPU-only machine: upstream sglang==0.5.23 with
# no CUDA package, the CPU shims, an import-only sgl_kernel, and tiersched itself (editable).
# Re-running is cheap: it does nothing when the inputs have not changed since the last successful run.
# GPU machines: use a normal `pip install -e .[test]` instead (docs/install.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
say() { echo "[tiersched setup] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "Python >= 3.11 is needed (sglang 0.5.23 requires it); set PYTHON=/path/to/python3.11+ and run again."

inputs_hash=$(cat "$ROOT/scripts/setup.sh" "$ROOT/requirements/"*.txt "$ROOT/pyproject.toml" \
  "$ROOT/cpu/shims/"*.py "$ROOT/cpu/sgl_kernel_stub/sgl_kernel/__init__.py" | sha256sum | cut -c1-16)
stamp="$VENV/.tiersched-setup-$inputs_hash"
if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=(pip_quiet "$VENV/bin/python" -m pip --disable-pip-version-check -q)
# Some machines' pip config names local index folders that do not exist; pip warns once per package about them.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
# Never let pip swap in a CUDA torch: the CPU wheel is the only torch allowed.
printf 'torch==2.13.0+cpu\n' > "$VENV/constraints-cpu.txt"
say "installing the CPU runtime of sglang 0.5.23 and tiersched's dependencies (a few minutes the first time)"
if ! "${PIP[@]}" install -c "$VENV/constraints-cpu.txt" \
      -r "$ROOT/requirements/cpu-runtime.txt" -r "$ROOT/requirements/tiersched.txt"; then
  die "pip could not install the CPU set without CUDA packages; torch must resolve to 2.13.0+cpu (pip index must offer it)."
fi
# sglang's and xgrammar's metadata pin a CUDA torch, flashinfer, sglang-kernel and triton: install them bare.
"${PIP[@]}" install --no-deps xgrammar==0.2.7 sglang==0.5.23 \
  || die "could not install sglang==0.5.23 (is the package registry reachable?)"
"${PIP[@]}" install --no-deps "$ROOT/cpu/sgl_kernel_stub"
"${PIP[@]}" install --no-deps -e "$ROOT"

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$ROOT/cpu/shims/tiersched_tv_shim.py" "$ROOT/cpu/shims/tiersched_triton_shim.py" "$SITE/"
echo "import tiersched_tv_shim, tiersched_triton_shim" > "$SITE/zz_tiersched_cpu_shims.pth"

# Refuse an environment that would pull CUDA: no nvidia-*/triton/flashinfer packages, a +cpu torch.
"$VENV/bin/python" -m tiersched.envcheck --cpu || die "the environment is not CPU-only or not pinned (see above)."
rm -f "$VENV"/.tiersched-setup-*
touch "$stamp"
say "ready: $VENV/bin/python ($("$VENV/bin/python" -c 'import sglang; print("sglang", sglang.__version__)' 2>/dev/null))"
