#!/usr/bin/env bash
# One-call GPU check (README "GPU check"): at most 8 minutes on one GPU, one JSON summary on stdout and, when OUT is
# set, in $OUT/gpu_check.json. Arguments go to bench/gpu_check.py (e.g. --data DIR, --stages env bench).
#
# A plain checkout runs it: wheels/*.whl (git-ignored; the pure-Python dependencies the GPU machine lacks) are
# installed into /tmp/site and put first on PYTHONPATH, the checkout itself second. Environment:
#   GPU_CHECK_DATA      ImageFolder root with train/ and val/ (default data/imagenette112)
#   GPU_CHECK_BUDGET_S  the whole check in seconds (default 480)
#   GPU_CHECK_PYTHON    interpreter (default .venv/bin/python when there is one, else python3)
#   GPU_CHECK_SITE      where the wheels go (default /tmp/site)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${GPU_CHECK_BUDGET_S:-480}
python=${GPU_CHECK_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=$(command -v python3 || echo python); fi
fi

shopt -s nullglob
wheels=(wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    site=${GPU_CHECK_SITE:-/tmp/site}
    # stdout stays the JSON's alone
    "$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade --target "$site" \
        "${wheels[@]}" 1>&2 || echo "gpu_check: installing wheels/ failed; the env stage lists what is missing" >&2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The driver keeps its own deadline (10 s under what is left); this outer limit only catches a driver that hangs.
left=$((budget - (SECONDS - start)))
if [ "$left" -lt 60 ]; then left=60; fi
timeout -k 5 "$((left - 5))" "$python" bench/gpu_check.py --budget-s "$((left - 10))" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    summary="{\"check\": \"gpu_check\", \"ok\": false, \"error\": \"bench/gpu_check.py ran past its ${left} s and was killed\"}"
    echo "$summary"
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && echo "$summary" > "$OUT/gpu_check.json"; fi
fi
exit "$rc"
