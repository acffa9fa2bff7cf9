#!/usr/bin/env bash
# `make test`'s pytest: everything but `gpu` and `long`, as two pytest processes side by side on the machine's cores (one
# pytest process keeps under one core busy on average). The background one runs the Slurm tests first, whose minutes
# go mostly to waiting on Slurm (time limits, requeues, the scheduler's 30 s checks), then the longest CPU tests (the
# cpu_tiny quality run, curation quality on real photos with its two trained embedders); the foreground one runs the
# rest. The background output follows the foreground's; the
# script fails when either run fails. usage: tests/run_suite.sh PYTHON [pytest args for both runs]
set -uo pipefail
py=$1
shift
cd "$(dirname "$0")/.."
background_files=(tests/test_slurm_*.py tests/test_quality_signal.py tests/test_curate_quality.py)
ignore=()
for file in "${background_files[@]}"; do ignore+=("--ignore=$file"); done
scratch=$(mktemp -d -t dinoforge-tests.XXXXXX)
log=$scratch/pytest.log
# its own base temp folder: two pytest sessions must not prune each other's numbered folders
"$py" -m pytest -m "not gpu and not long" --durations=10 --basetemp "$scratch/tmp" "$@" "${background_files[@]}" >"$log" 2>&1 &
background=$!
trap 'kill "$background" 2>/dev/null; exit 130' INT TERM
"$py" -m pytest -m "not gpu and not long" --durations=10 "${ignore[@]}" "$@"
main_rc=$?
wait "$background"
background_rc=$?
echo "==================== ${background_files[*]} (run beside the others) ===================="
cat "$log"
rm -rf "$scratch"
# pytest exits 5 when nothing was collected (e.g. a -k that matches none of one run's tests): not a failure
[ "$background_rc" = 5 ] && background_rc=0
[ "$main_rc" = 5 ] && main_rc=0
exit $(( main_rc != 0 || background_rc != 0 ))
