#!/usr/bin/env bash
# prepare_exec: the job's own clone of the project's VM, resumed from its
# memory snapshot (`migrant snapshot --memory` made it once), left running
# for the run stages.
source "$(dirname "$0")/base.sh"
vm=$(job_vm)
echo "Resuming $vm from the snapshot of $project"
"$MIGRANT" -C "$project" run --snapshot --clone --name "$vm" -- true \
  || system_failure "cannot start the job's VM $vm"
