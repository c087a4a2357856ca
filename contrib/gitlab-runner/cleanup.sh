#!/usr/bin/env bash
# cleanup_exec: the job's clone destroyed, whatever happened before
# (failed or cancelled jobs too); a clone that never started is fine.
source "$(dirname "$0")/base.sh"
vm=$(job_vm)
rc=0
"$MIGRANT" destroy --name "$vm" >/dev/null 2>&1 || rc=$?
# 69: no VM of that name.
case $rc in
  0 | 69) exit 0 ;;
  *) system_failure "cannot destroy the job's VM $vm (exit $rc)" ;;
esac
