#!/usr/bin/env bash
# cleanup_exec: the job's clone destroyed, whatever happened before
# (failed or cancelled jobs too); a job whose prepare made nothing has
# nothing to clean, and a VM this job did not make is never touched.
source "$(dirname "$0")/base.sh"
vm=$(job_vm)
record=$(record_of "$vm")
[[ -e $record ]] || exit 0
require_record "$vm"
rc=0
"$MIGRANT" destroy --name "$vm" >/dev/null 2>&1 || rc=$?
# 69: no VM of that name (prepare failed after recording it).
case $rc in
  0 | 69) rm -f "$record"; exit 0 ;;
  *) system_failure "cannot destroy the job's VM $vm (exit $rc)" ;;
esac
