#!/usr/bin/env bash
# config_exec: where builds live in the guest, and who the driver is.
source "$(dirname "$0")/base.sh"
version=$("$MIGRANT" --version 2>/dev/null | awk '{print $2}')
cat <<JSON
{
  "builds_dir": "/var/tmp/gitlab/builds",
  "cache_dir": "/var/tmp/gitlab/cache",
  "builds_dir_is_shared": false,
  "driver": { "name": "migrant", "version": "${version:-unknown}" }
}
JSON
