#!/usr/bin/env bash
# run_exec: one of the job's scripts (get_sources, build_script, …) in the
# job's clone, fed to bash on standard input. The job's own failure is a
# build failure; SSH's (255: the VM is gone) is a system failure.
source "$(dirname "$0")/base.sh"
script=${1:?"the script's path"}
stage=${2:-}
vm=$(job_vm)
require_record "$vm"
rc=0
"$MIGRANT" ssh --name "$vm" -- bash <"$script" || rc=$?
case $rc in
  0) exit 0 ;;
  255) system_failure "lost the job's VM $vm during $stage" ;;
  *) exit "${BUILD_FAILURE_EXIT_CODE:-1}" ;;
esac
