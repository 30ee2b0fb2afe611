#!/usr/bin/env bash
# The `ray job submit` entrypoint (launch/submit.sh uses it): runs `forge ARGS...`.
#
# It starts in Ray's unpacked copy of the job's working dir. Ray (2.60) deletes and unpacks
# that copy again when the driver's own job starts its first actors, which pulls the
# driver's cwd and any module it has not imported yet out from under it. So the driver runs
# from a private snapshot of the code; actors keep using Ray's copy. Give the run an
# absolute output_dir on storage the nodes share (a relative one lands in the snapshot).
set -euo pipefail
snapshot="$(mktemp -d "${TMPDIR:-/tmp}/forge-job-XXXXXX")"
cp -r . "$snapshot/repo"
cd "$snapshot/repo"
exec python -m forge.cli "$@"
