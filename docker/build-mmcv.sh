#!/usr/bin/env bash
# mmcv with its C++ (and, with FORCE_CUDA=1, CUDA) ops, compiled against the torch already installed for
# PYTHON, then installed. Used by `make setup` and docker/Dockerfile alike.
#
#   docker/build-mmcv.sh PYTHON
#
# mmcv 2.1.0 publishes no wheels for recent torch, only its source. Its setup.py passes -std=c++17 for
# every torch after 1.12.1, after CXXFLAGS (so the environment cannot override it), while torch 2.14's
# ATen/ATen.h stops with "#error C++20 or later compatible compiler is required": the source is patched
# to -std=c++20 before it is compiled. The wheel is kept in DET_MMDET_WHEELS (default
# ~/.cache/det-mmdet/wheels), one folder per torch version, so a second setup installs it in seconds.
set -euo pipefail
python=${1:?usage: docker/build-mmcv.sh PYTHON}
cd "$(dirname "$0")/.."
pin=$(grep '^mmcv==' requirements.txt)
version=${pin#mmcv==}
torch=$("$python" -c 'import torch; print(torch.__version__.replace("+", "_"))')
cuda=$([ "${FORCE_CUDA:-0}" = 1 ] && echo "cuda-${TORCH_CUDA_ARCH_LIST:-default}" | tr ' ;' '__' || echo cpu)
wheels=${DET_MMDET_WHEELS:-$HOME/.cache/det-mmdet/wheels}/torch-$torch-$cuda
shopt -s nullglob
built=("$wheels"/mmcv-"$version"-*.whl)
if [ ${#built[@]} -eq 0 ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "$pin" -d "$work"
    tar -xzf "$work/mmcv-$version.tar.gz" -C "$work"
    sed -i 's/-std=c++17/-std=c++20/g' "$work/mmcv-$version/setup.py"
    grep -q -- '-std=c++20' "$work/mmcv-$version/setup.py" || { echo "mmcv $version: no C++ standard flag to patch" >&2; exit 1; }
    echo "compiling mmcv $version with its ops against torch $torch ($cuda); about 25 minutes on 2 cores, once" >&2
    MMCV_WITH_OPS=1 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$work/mmcv-$version"
    built=("$wheels"/mmcv-"$version"-*.whl)
fi
"$python" -m pip install -q --no-deps --force-reinstall "${built[0]}"
