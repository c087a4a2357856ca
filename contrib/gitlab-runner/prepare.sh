#!/usr/bin/env bash
# prepare_exec: the job's own clone of the project's VM, resumed from its
# memory snapshot (`migrant snapshot --memory` made it once), left running
# for the run stages, and recorded as this job's.
source "$(dirname "$0")/base.sh"
vm=$(job_vm)
record=$(record_of "$vm")
(umask 077 && mkdir -p "$records") || system_failure "cannot make $records"
# A record already there: not ours to take over.
(set -o noclobber && umask 077 && printf '%s' "$JOB_RESPONSE_FILE" >"$record") 2>/dev/null ||
  system_failure "a VM named $vm is already recorded; refusing to reuse it"
echo "Resuming $vm from the snapshot of $project"
if ! "$MIGRANT" -C "$project" run --snapshot --clone --name "$vm" -- true; then
  rm -f "$record"
  system_failure "cannot start the job's VM $vm"
fi
