# Shared by the stages of the GitLab Runner custom executor driver for
# migrant (sourced, not run). The first argument of every stage is the
# project folder (given by config.toml's *_args): its Migrantfile and the
# memory snapshot each job's clone resumes. A job variable cannot choose it.
set -euo pipefail

MIGRANT=${MIGRANT:-migrant}

project=${1:?"the project folder is the stages' first argument (config.toml: *_args)"}
shift

# Exit with GitLab's code for a failure of the system, not of the job.
system_failure() {
  echo "migrant driver: $*" >&2
  exit "${SYSTEM_FAILURE_EXIT_CODE:-1}"
}

# Where prepare records the clones it made (the runner's user only). A
# stage acts on a VM only if its record is there: never on the project's
# own VM, another driver's VM, or a name a job chose.
# A service user (gitlab-runner) often has no XDG_RUNTIME_DIR: its home.
if [[ $(id -u) == 0 ]]; then user_runtime=/run; else user_runtime=${HOME:?}/.local/state; fi
records=${MIGRANT_GITLAB_RECORDS:-${XDG_RUNTIME_DIR:-$user_runtime}/migrant-gitlab}

# One clone per job, named from what the job cannot set: GitLab's job id
# in the runner's job response (JOB_RESPONSE_FILE; the CUSTOM_ENV_
# variables are the job's own and may copy another job's ids), and the
# response file's path, which the runner makes anew for each job (two
# GitLab instances may both have a job 7).
job_vm() {
  local response=${JOB_RESPONSE_FILE:-}
  [[ -n $response && -f $response ]] ||
    system_failure "JOB_RESPONSE_FILE is not set or not a file: a GitLab Runner that gives the custom executor its job response is needed (the job's own CI_JOB_ID is not trusted)"
  local id
  id=$(python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))
i = d.get("id") if isinstance(d, dict) else None
if type(i) is not int or i <= 0:
    sys.exit("no job id in the job response")
print(i)' "$response") || system_failure "cannot read the job id from $response"
  local tag
  tag=$(printf '%s' "$response" | sha256sum | cut -c1-8)
  printf 'gitlab-%s-%s' "$id" "$tag"
}

# The record of the job's clone.
record_of() { printf '%s/%s' "$records" "$1"; }

# Refuse to act on a VM this driver did not make for this job.
require_record() {
  local vm=$1 record
  record=$(record_of "$vm")
  [[ -f $record && ! -L $record ]] ||
    system_failure "$vm was not made by this driver's prepare stage; refusing to touch it"
  [[ $(cat "$record") == "${JOB_RESPONSE_FILE:-}" ]] ||
    system_failure "$vm belongs to another job; refusing to touch it"
}
