#!/usr/bin/env bash
# Smoke test of the frozen Linux build (minutes of CPU: kept out of the pytest suite).
#
#   bash installers/linux/smoke.sh [dist/cp3d]
#
# 1. `cp3d-cli --help` start time (best of 3; fails above CP3D_MAX_HELP_S, default 5 s) and
#    `cp3d-cli models` lists the model bundled in the install folder.
# 2. The frozen cp3d-cli segments the sample volume with no network (unshare -n where allowed);
#    results land beside the image; mask count within 20% of the ground truth and masks equal,
#    voxel for voxel, to a non-frozen run's (CP3D_REF_PYTHON, default the build venv's python).
# 3. numba's cache landed in the user's cache folder and nothing in the install folder changed.
# 4. The frozen cp3d opens the sample (with those masks) under Xvfb; a screenshot of the screen
#    must not be blank: build/linux-smoke-screenshot.png.
# 5. With CP3D_SMOKE_DEB=1 (root): installs dist/cp3d_*.deb, runs /usr/bin/cp3d-cli, purges it.
# Figures go to build/linux-smoke.txt. A fresh HOME is used, so no user settings or caches leak in.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUNDLE=$(realpath "${1:-dist/cp3d}")
REF_PY=${CP3D_REF_PYTHON:-${CP3D_BUILD_VENV:-$ROOT/build/venv}/bin/python}
MAX_HELP_S=${CP3D_MAX_HELP_S:-5}
GUI_WAIT_S=${CP3D_GUI_WAIT_S:-30}
SAMPLE=$ROOT/cp3d/resources/sample/sample_nuclei.tif
TRUTH=$ROOT/cp3d/resources/sample/sample_nuclei_masks.tif
REPORT=$ROOT/build/linux-smoke.txt
SHOT=$ROOT/build/linux-smoke-screenshot.png

[[ -x "$BUNDLE/cp3d-cli" && -x "$BUNDLE/cp3d" ]] || { echo "no bundle at $BUNDLE" >&2; exit 1; }
[[ -x "$REF_PY" ]] || { echo "no reference python at $REF_PY (set CP3D_REF_PYTHON)" >&2; exit 1; }
mkdir -p "$ROOT/build"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cp3d-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# A fresh user: platformdirs folders (cache, models, logs, settings) all under this HOME.
REAL_HOME=$HOME
export HOME=$WORK/home
unset XDG_CACHE_HOME XDG_CONFIG_HOME XDG_DATA_HOME XDG_STATE_HOME NUMBA_CACHE_DIR TORCH_HOME
mkdir -p "$HOME"
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }
fail() { say "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

snapshot() { (cd "$BUNDLE" && find . -printf '%p %s %T@\n' | sort); }
snapshot >"$WORK/bundle.before"

# No network for the frozen runs, where the kernel lets us make a network namespace.
NONET=()
if unshare -n true 2>/dev/null; then NONET=(unshare -n)
elif unshare -rn true 2>/dev/null; then NONET=(unshare -rn)
fi
say "bundle: $BUNDLE ($(du -sh "$BUNDLE" | cut -f1)); no-network runs: ${NONET[*]:-not available}"

# 1. start time and bundled model ---------------------------------------------------------------
times=()
for _ in 1 2 3; do
    t=$(now)
    "$BUNDLE/cp3d-cli" --help >/dev/null
    times+=("$(since "$t")")
done
best=$(printf '%s\n' "${times[@]}" | sort -n | awk 'NR == 1')
say "cp3d-cli --help: ${times[*]} s (best $best s, limit $MAX_HELP_S s)"
awk -v b="$best" -v m="$MAX_HELP_S" 'BEGIN { exit !(b <= m) }' || fail "--help too slow"

"${NONET[@]}" "$BUNDLE/cp3d-cli" models >"$WORK/models.txt" 2>&1 || { cat "$WORK/models.txt"; fail "cp3d-cli models"; }
grep "cp3d_nuclei" "$WORK/models.txt" | grep -q "$BUNDLE/" \
    || { cat "$WORK/models.txt"; fail "bundled model not listed from the install folder"; }
say "cp3d-cli models: cp3d_nuclei listed from the install folder"

# 2. frozen and non-frozen runs on the sample ---------------------------------------------------
mkdir -p "$WORK/frozen" "$WORK/ref"
cp "$SAMPLE" "$WORK/frozen/"
cp "$SAMPLE" "$WORK/ref/"
t=$(now)
"${NONET[@]}" "$BUNDLE/cp3d-cli" --image_path "$WORK/frozen/sample_nuclei.tif" \
    >"$WORK/frozen.log" 2>&1 || { tail -n 30 "$WORK/frozen.log"; fail "frozen cp3d-cli run"; }
say "frozen cp3d-cli on the sample: $(since "$t") s"
for f in sample_nuclei_cp_masks.tif sample_nuclei_seg.npy; do
    [[ -s "$WORK/frozen/$f" ]] || fail "frozen run wrote no $f beside the image"
done

if [[ -n "${CP3D_REF_MASKS:-}" ]]; then
    cp "$CP3D_REF_MASKS" "$WORK/ref/sample_nuclei_cp_masks.tif"
    say "non-frozen masks taken from $CP3D_REF_MASKS"
else
    t=$(now)
    # The checkout's cp3d (what build_app.spec froze), not a copy installed in the venv.
    PYTHONPATH=$ROOT "$REF_PY" -c 'import sys; from cp3d.core.cli import main; sys.exit(main(sys.argv[1:]))' \
        --image_path "$WORK/ref/sample_nuclei.tif" >"$WORK/ref.log" 2>&1 \
        || { tail -n 30 "$WORK/ref.log"; fail "non-frozen run"; }
    say "non-frozen cp3d-cli on the sample: $(since "$t") s"
fi

"$REF_PY" - "$WORK/frozen/sample_nuclei_cp_masks.tif" "$WORK/ref/sample_nuclei_cp_masks.tif" \
    "$TRUTH" <<'PY' | tee -a "$REPORT"
import sys
import numpy as np
import tifffile
frozen, ref, truth = (tifffile.imread(p) for p in sys.argv[1:4])
n = lambda m: len(np.unique(m[m > 0]))
nf, nr, nt = n(frozen), n(ref), n(truth)
equal = frozen.shape == ref.shape and np.array_equal(frozen, ref)
print(f"masks: frozen {nf}, non-frozen {nr}, ground truth {nt}; frozen == non-frozen: {equal}")
if abs(nf - nt) > 0.2 * nt:
    sys.exit(f"FAIL: frozen mask count {nf} not within 20% of the ground truth {nt}")
if not equal:
    diff = int((frozen != ref).sum()) if frozen.shape == ref.shape else -1
    sys.exit(f"FAIL: frozen masks differ from the non-frozen run ({diff} voxels)")
PY

# 3. user folders, not the install folder --------------------------------------------------------
nbi=$(find "$HOME" -path '*cp3d*numba*' -name '*.nbi' 2>/dev/null | wc -l)
[[ "$nbi" -gt 0 ]] || fail "no numba cache index under the user's cache folder ($HOME)"
say "numba cache: $nbi index file(s) in $(find "$HOME" -type d -name numba -path '*cp3d*' | awk 'NR == 1' | sed "s|$HOME|~|")"
snapshot >"$WORK/bundle.after"
if ! diff -q "$WORK/bundle.before" "$WORK/bundle.after" >/dev/null; then
    diff "$WORK/bundle.before" "$WORK/bundle.after" | head -n 20
    fail "the install folder changed during the runs"
fi
say "install folder unchanged by the runs"

# 4. the GUI under Xvfb ------------------------------------------------------------------------
mkdir -p "$WORK/gui"
cp "$WORK/frozen/sample_nuclei.tif" "$WORK/frozen/sample_nuclei_cp_masks.tif" \
   "$WORK/frozen/sample_nuclei_seg.npy" "$WORK/gui/"
cat >"$WORK/gui.sh" <<GUI
set -u
${NONET[*]} "$BUNDLE/cp3d" "$WORK/gui/sample_nuclei.tif" >"$WORK/gui.log" 2>&1 &
pid=\$!
sleep $GUI_WAIT_S
if ! kill -0 \$pid 2>/dev/null; then echo "the app exited early"; exit 3; fi
"$REF_PY" "$ROOT/installers/linux/grab_screen.py" "$SHOT"
rc=\$?
kill \$pid; wait \$pid 2>/dev/null
exit \$rc
GUI
t=$(now)
xvfb-run -a -s "-screen 0 1600x1000x24" bash "$WORK/gui.sh" | tee -a "$REPORT" \
    || { tail -n 30 "$WORK/gui.log"; fail "GUI screenshot"; }
if grep -q "Traceback" "$WORK/gui.log"; then cat "$WORK/gui.log"; fail "traceback from the frozen app"; fi
say "frozen cp3d under Xvfb: screenshot in $SHOT"

# 5. optional: the .deb on this machine ----------------------------------------------------------
if [[ "${CP3D_SMOKE_DEB:-0}" == 1 ]]; then
    deb=$(ls -t "$ROOT"/dist/cp3d_*.deb | awk 'NR == 1')
    dpkg -s cp3d >/dev/null 2>&1 && fail "cp3d is already installed; not touching it"
    apt-get install -y -qq "$deb" >/dev/null 2>&1 || dpkg -i "$deb" >/dev/null
    /usr/bin/cp3d-cli --help >/dev/null || fail "/usr/bin/cp3d-cli from the .deb"
    HOME=$WORK/home2 /usr/bin/cp3d-cli models | grep -q "/opt/cp3d/" || fail "deb: bundled model not under /opt/cp3d"
    desktop-file-validate /usr/share/applications/cp3d.desktop 2>/dev/null || true
    dpkg --purge cp3d >/dev/null
    [[ ! -e /opt/cp3d && ! -e /usr/bin/cp3d ]] || fail "deb purge left files"
    say "deb: $(basename "$deb") installed, /usr/bin/cp3d-cli ran from /opt/cp3d, purged cleanly"
fi
export HOME=$REAL_HOME
say "smoke test passed"
