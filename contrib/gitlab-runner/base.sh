# Shared by the stages of the GitLab Runner custom executor driver for
# migrant (sourced, not run). The first argument of every stage is the
# project folder (given by config.toml's *_args): its Migrantfile and the
# memory snapshot each job's clone resumes. A job variable cannot choose it.
set -euo pipefail

MIGRANT=${MIGRANT:-migrant}

project=${1:?"the project folder is the stages' first argument (config.toml: *_args)"}
shift

# One clone per job, named after the runner and the job (unique on a host).
job_vm() {
  local runner=${CUSTOM_ENV_CI_RUNNER_ID:-0}
  local job=${CUSTOM_ENV_CI_JOB_ID:?CUSTOM_ENV_CI_JOB_ID is not set: not run by GitLab Runner}
  printf 'gitlab-%s-%s' "$runner" "$job" | tr -c 'A-Za-z0-9_.-' '-'
}

# Exit with GitLab's code for a failure of the system, not of the job.
system_failure() {
  echo "migrant driver: $*" >&2
  exit "${SYSTEM_FAILURE_EXIT_CODE:-1}"
}
