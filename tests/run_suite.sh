#!/usr/bin/env bash
# `make test`'s pytest: everything but `gpu`, as two pytest processes side by side on the machine's cores. The
# `slurm` and `slow` tests run in the background one: the Slurm tests' minutes go mostly to waiting on Slurm (time
# limits, requeues, the scheduler's 30 s checks), and the slow ones fill that time with work. Its output follows the
# foreground run's; the script fails when either run fails. usage: tests/run_suite.sh PYTHON [pytest args for both]
set -uo pipefail
py=$1
shift
scratch=$(mktemp -d -t dinoforge-tests.XXXXXX)
log=$scratch/pytest.log
# its own base temp folder: two pytest sessions must not prune each other's numbered folders
"$py" -m pytest -m "(slurm or slow) and not gpu" --basetemp "$scratch/tmp" "$@" >"$log" 2>&1 &
background=$!
trap 'kill "$background" 2>/dev/null; exit 130' INT TERM
"$py" -m pytest -m "not slurm and not slow and not gpu" "$@"
main_rc=$?
wait "$background"
background_rc=$?
echo "==================== slurm and slow tests (run beside the others) ===================="
cat "$log"
rm -rf "$scratch"
# pytest exits 5 when nothing was collected (e.g. a -k that matches none of one run's tests): not a failure
[ "$background_rc" = 5 ] && background_rc=0
[ "$main_rc" = 5 ] && main_rc=0
exit $(( main_rc != 0 || background_rc != 0 ))
