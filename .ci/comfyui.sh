#!/usr/bin/env bash
# Install one real, headless ComfyUI (CPU) for the tests, into the venv of PYTHON.
#
#   bash .ci/comfyui.sh PYTHON DEST VERSION      # prints the ComfyUI folder (DEST/ComfyUI)
#
# Where ComfyUI comes from, first that exists:
#   1. ../shared/comfyui/ComfyUI-VERSION.tar.gz with its install.sh (this workshop's copies,
#      which also work around the CPU torch wheel's missing torchvision/torchaudio C ops);
#   2. a clone of ComfyUI's repository at tag vVERSION (needs the network), installed with
#      its requirements minus torch, torchvision and torchaudio, which stay as they are.
# A contributor's own ComfyUI is not installed here: .ci/run uses COMFYUI_PATH as it is.
set -euo pipefail
PY=${1:?usage: comfyui.sh PYTHON DEST VERSION}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute (install.sh runs it from DEST), links kept
DEST=${2:?usage: comfyui.sh PYTHON DEST VERSION}
VERSION=${3:?usage: comfyui.sh PYTHON DEST VERSION}
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=$HERE/../../shared/comfyui
REPO_URL=https://github.com/comfyanonymous/ComfyUI

if [ -f "$SHARED/ComfyUI-$VERSION.tar.gz" ] && [ -f "$SHARED/install.sh" ]; then
  bash "$SHARED/install.sh" "$PY" "$DEST" "$VERSION"
  exit 0
fi

mkdir -p "$DEST"
rm -rf "$DEST/ComfyUI"
if ! git clone --quiet --depth 1 --branch "v$VERSION" "$REPO_URL" "$DEST/ComfyUI" >&2; then
  cat >&2 <<MSG
comfyui.sh: cannot get ComfyUI v$VERSION: there is no ../shared/comfyui/ComfyUI-$VERSION.tar.gz
beside this checkout, and cloning $REPO_URL (tag v$VERSION) failed (no network?).
Either point COMFYUI_PATH at a ComfyUI checkout of yours (its requirements are installed into
the test venv), or run again where that repository can be reached.
MSG
  exit 1
fi
grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$DEST/ComfyUI/requirements.txt" \
  > "$DEST/requirements-notorch.txt"
"$PY" -m pip install --quiet -r "$DEST/requirements-notorch.txt" requests websocket-client
(cd "$DEST/ComfyUI" && "$PY" main.py --cpu --quick-test-for-ci --disable-auto-launch) \
  >"$DEST/quick-test.log" 2>&1 \
  || { echo "comfyui.sh: ComfyUI failed its start-up check; see $DEST/quick-test.log" >&2; exit 1; }
echo "$DEST/ComfyUI"
