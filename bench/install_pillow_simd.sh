#!/usr/bin/env bash
# `make simd`: replace pillow by pillow-simd (SIMD resize, filters and colour conversion) in a virtual environment.
#
# usage: bash bench/install_pillow_simd.sh PYTHON            # install pillow-simd
#        bash bench/install_pillow_simd.sh PYTHON --restore  # put the pillow it replaced back
#
# pillow-simd publishes sources only: it is compiled here (with -mavx2 where /proc/cpuinfo lists avx2, else SSE4),
# into a wheel first, and swapped for pillow only once that wheel exists, so a failed build leaves pillow untouched.
# The replaced pillow stays in PREFIX/pillow-plain/ (its wheel, to restore, and an unpacked site dir that
# bench/bench_augment.py puts first on a second process's path to measure against), beside the build's log. Root with
# apt-get: the codec headers are installed first. Both install the same `PIL` package: a later `pip install pillow`
# (e.g. `make venv` after pyproject.toml changes) overwrites pillow-simd; run this again then.
# Exit status: 0 installed (or restored), 1 pillow kept, with one line saying why.
set -uo pipefail

PY=${1:?usage: bash bench/install_pillow_simd.sh PYTHON [--restore]}
MODE=${2:-install}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)') || { echo "simd: $PY does not run"; exit 1; }
PLAIN="$PREFIX/pillow-plain"
# Codec headers Pillow compiles against: JPEG and zlib are required, the others give the formats dinoforge decodes.
APT_PACKAGES=(libjpeg-dev zlib1g-dev libpng-dev libtiff-dev libwebp-dev libfreetype-dev liblcms2-dev libopenjp2-7-dev)
# Codecs PIL.features names; pillow-simd may be built without some the pillow wheel bundles (AVIF needs libavif 1.0+).
CODECS=(jpg zlib webp libtiff avif jpg_2000)

installed() {  # "pillow 13.0.0" / "pillow-simd 12.1.1.post0": the build `import PIL` gets, or "none"
    # by the running version, not pip's records: pip installing pillow over pillow-simd leaves both records
    "$PY" - <<'EOF' 2>/dev/null || echo none
import importlib.metadata as md
import PIL
names = {d.metadata["Name"].lower(): d.version for d in md.distributions() if d.metadata["Name"]}
simd = ".post" in PIL.__version__ or names.get("pillow-simd") == PIL.__version__
print(f"{'pillow-simd' if simd else 'pillow'} {PIL.__version__}")
EOF
}

codecs() {  # the codecs of CODECS that the PIL importable by $PY decodes, space-separated
    "$PY" -c "from PIL import features; print(' '.join(c for c in '${CODECS[*]}'.split() if features.check(c)))"
}

check() {  # the package and torchvision import and one JPEG decodes and resizes through the one decoder
    (cd "$REPO" && "$PY" -c "
import io, torchvision
from PIL import Image
from dinoforge.data.decode import decode_image, decoder_name
buf = io.BytesIO(); Image.new('RGB', (64, 48), (200, 30, 30)).save(buf, 'JPEG')
assert decode_image(buf.getvalue()).resize((32, 24), Image.BILINEAR).size == (32, 24)
print(decoder_name())")
}

restore() {  # reinstall the pillow wheel kept in $PLAIN (or the index's pillow when none was kept)
    local wheel
    wheel=$(ls "$PLAIN"/wheel/pillow-*.whl 2>/dev/null | head -n 1)
    "$PY" -m pip uninstall -q -y pillow-simd >/dev/null 2>&1
    "$PY" -m pip install -q --force-reinstall --no-deps "${wheel:-pillow}"
}

if [ "$MODE" = "--restore" ]; then
    if restore; then echo "simd: restored $(installed) ($(check 2>/dev/null || echo 'import check FAILED'))"; exit 0; fi
    echo "simd: could not reinstall pillow: run $PY -m pip install --force-reinstall pillow"; exit 1
fi
[ "$MODE" = install ] || { echo "simd: unknown option $MODE (use --restore)"; exit 1; }

before=$(installed)
case "$before" in
    pillow-simd*) echo "simd: $before is already installed (bash $0 $PY --restore puts pillow back)"; exit 0;;
esac
[ "$before" != none ] || { echo "simd: no pillow in $PREFIX; make venv first"; exit 1; }
version=${before#pillow }

if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then cflags=-mavx2; else cflags=""; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "simd: apt-get install ${missing[*]}"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
            echo "simd: apt-get failed; building with the headers there are"
    fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Keep what is replaced first: without pillow's wheel there would be no way back offline.
rm -rf "$PLAIN" && mkdir -p "$PLAIN/wheel" &&
    "$PY" -m pip download -q --no-deps --only-binary :all: -d "$PLAIN/wheel" "pillow==$version" &&
    "$PY" -m pip install -q --no-deps --target "$PLAIN/site" "$PLAIN"/wheel/pillow-*.whl ||
    { echo "simd: pillow kept: could not keep a copy of pillow $version to restore (pip download failed)"; exit 1; }

echo "simd: building pillow-simd from source (CC=${CC:-cc} ${cflags:-(no AVX2 on this CPU: SSE4)}; a few minutes)"
if ! CC="${CC:-cc} $cflags" "$PY" -m pip wheel -q --no-deps --no-binary pillow-simd -w "$work" pillow-simd \
        >"$PLAIN/build.log" 2>&1; then
    # the compiler's or Pillow's own words (a missing header names its library), not pip's generic wrapper lines
    reason=$(grep -iE "headers or library|RequiredDependency|fatal error|error:|not found" "$PLAIN/build.log" |
             grep -viE "subprocess-exited-with-error|originates from a subprocess|failed (building|to build)" |
             head -n 1 | sed 's/^ *//')
    echo "simd: pillow kept ($before): the pillow-simd build failed: ${reason:-see the log}" \
        "(log: $PLAIN/build.log)" | cut -c 1-400
    exit 1
fi
plain_codecs=$(codecs)
# --force-reinstall: after pip put pillow back over pillow-simd, pillow-simd's record is still there
if ! "$PY" -m pip uninstall -q -y pillow ||
        ! "$PY" -m pip install -q --force-reinstall --no-deps "$work"/pillow_simd-*.whl; then
    restore
    echo "simd: pillow kept ($(installed)): installing the built pillow-simd wheel failed"
    exit 1
fi
if ! name=$(check 2>"$work/check.log"); then
    restore
    echo "simd: pillow kept ($(installed)): with pillow-simd the package no longer imports:" \
        "$(tail -n 1 "$work/check.log")"
    exit 1
fi
simd_codecs=$(codecs)
lost=$(comm -23 <(tr ' ' '\n' <<<"$plain_codecs" | sort) <(tr ' ' '\n' <<<"$simd_codecs" | sort) | tr '\n' ' ')
echo "simd: installed $name in place of $before (images decoded with $name)"
[ -z "${lost// /}" ] || echo "simd: WARNING: this build decodes no ${lost% } (pillow did): such files are rejected" \
    "as unsupported; bash bench/install_pillow_simd.sh $PY --restore puts pillow back"
echo "simd: pillow $version kept in $PLAIN: bench/bench_augment.py measures against it"
