#!/usr/bin/env bash
# Install detkd's optional MMDetection support into the active Python environment:
#   bash scripts/install_mmdet.sh            (from the repository root, inside your venv)
#
# What it does, and why each step is needed:
#   1. pip install -c constraints.txt -e ".[mmdet]"  (detkd + mmdet 3.3.0 + mmengine 0.10.7)
#   2. builds mmcv 2.1.0 with its compiled ops for the installed torch. mmdet 3.3.0 refuses
#      mmcv >= 2.2, mmcv-lite has no ops (no NMS, no RoIAlign), and PyPI has no mmcv 2.1.0
#      wheel for torch 2.14, so it is built from the sdist:
#        - torch 2.14's headers need C++20; mmcv 2.1.0's setup.py asks for -std=c++17 (patched);
#        - its setup.py imports pkg_resources, gone from setuptools >= 81 (setuptools<81);
#        - --no-build-isolation, else pip builds it without torch and silently drops the ops.
#      About 11 minutes on 2 CPU cores (CPU ops; FORCE_CUDA=1 with nvcc adds the CUDA kernels).
#   3. keeps the built wheel in a cache keyed by mmcv, torch and Python versions
#      ($DETKD_WHEEL_CACHE, default ~/.cache/detkd/wheels), so later installs on the same
#      machine take seconds, and checks that `import mmcv.ops, mmdet.models` works.
#
#   bash scripts/install_mmdet.sh --cache-key   prints the cache subfolder name for the installed torch
#   (e.g. mmcv-2.1.0-torch2.14.1_cu130-cp311-cuda0) and installs nothing; .ci/run uses it to find a
#   prebuilt wheel in ../shared/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

MMCV_VERSION=2.1.0
cache_key() {
  local torch_version py_tag
  torch_version=$(python -c "import torch; print(torch.__version__.replace('+', '_'))")
  py_tag=$(python -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  echo "mmcv-${MMCV_VERSION}-torch${torch_version}-${py_tag}-cuda${FORCE_CUDA:-0}"
}
if [ "${1:-}" = "--cache-key" ]; then
  cache_key
  exit 0
fi

pip install -q -c constraints.txt -e ".[mmdet]"
pip install -q -c constraints.txt "setuptools<81" wheel ninja psutil

torch_version=$(python -c "import torch; print(torch.__version__.replace('+', '_'))")
cuda=${FORCE_CUDA:-0}
cache="${DETKD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/detkd/wheels}/$(cache_key)"
wheel=$(ls "$cache"/mmcv-"${MMCV_VERSION}"-*.whl 2>/dev/null | head -n 1 || true)

if [ -z "$wheel" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "install_mmdet: building mmcv ${MMCV_VERSION} with ops against torch ${torch_version} (about 11 min on 2 cores)"
  start=$(date +%s)
  pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==${MMCV_VERSION}"
  tar -xzf "$work/mmcv-${MMCV_VERSION}.tar.gz" -C "$work"
  src="$work/mmcv-${MMCV_VERSION}"
  grep -q "'-std=c++17'" "$src/setup.py" || { echo "install_mmdet: mmcv setup.py has no -std=c++17 flag to patch" >&2; exit 1; }
  sed -i "s/'-std=c++17'/'-std=c++20'/g" "$src/setup.py"
  jobs=${MAX_JOBS:-$(python -c "import os; print(max(1, len(os.sched_getaffinity(0))))")}
  MMCV_WITH_OPS=1 FORCE_CUDA="$cuda" MAX_JOBS="$jobs" \
    pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$src"
  mkdir -p "$cache"
  built=$(ls "$work"/dist/mmcv-*.whl)
  cp "$built" "$cache/.$(basename "$built").partial"
  mv "$cache/.$(basename "$built").partial" "$cache/$(basename "$built")"   # atomic: no half-written cache entry
  wheel="$cache/$(basename "$built")"
  echo "install_mmdet: built in $(( $(date +%s) - start )) s, cached at $wheel"
else
  echo "install_mmdet: using the cached mmcv wheel $wheel"
fi
pip install -q --no-deps --force-reinstall "$wheel"
python -c "import mmcv, mmcv.ops, mmdet, mmdet.models; print(f'install_mmdet: mmdet {mmdet.__version__}, mmcv {mmcv.__version__} with ops')"
