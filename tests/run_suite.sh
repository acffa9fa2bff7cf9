#!/usr/bin/env bash
# `make test`'s pytest: everything but `gpu`, with the `slurm` tests in a second pytest process beside the rest.
# Their minutes go mostly to waiting on Slurm (time limits, requeues, the scheduler's 30 s checks), so overlapping
# them with the CPU-bound tests keeps the suite's wall time down. Their output follows the main run's; the script
# fails when either run fails. usage: tests/run_suite.sh PYTHON [pytest args for both runs]
set -uo pipefail
py=$1
shift
scratch=$(mktemp -d -t dinoforge-slurm-tests.XXXXXX)
log=$scratch/pytest.log
# its own base temp folder: two pytest sessions must not prune each other's numbered folders
"$py" -m pytest -m "slurm and not gpu" --basetemp "$scratch/tmp" "$@" >"$log" 2>&1 &
slurm_pid=$!
trap 'kill "$slurm_pid" 2>/dev/null; exit 130' INT TERM
"$py" -m pytest -m "not slurm and not gpu" "$@"
main_rc=$?
wait "$slurm_pid"
slurm_rc=$?
echo "==================== slurm-marked tests (run beside the others) ===================="
cat "$log"
rm -rf "$scratch"
# pytest exits 5 when nothing was collected (e.g. a -k that matches no slurm test): not a failure
[ "$slurm_rc" = 5 ] && slurm_rc=0
[ "$main_rc" = 5 ] && main_rc=0
exit $(( main_rc != 0 || slurm_rc != 0 ))
