"""How a scheduler names itself to its executors: the metadata key and this process's default id."""

from __future__ import annotations

import secrets

# Sent on Describe and on the Step stream; an executor serves one scheduler id at a time.
SCHEDULER_ID_METADATA_KEY = "x-pagewire-scheduler-id"

# Chosen once per process: every engine of one scheduler process shares it, a restarted process gets a new
# one unless `--scheduler-id` names it again.
PROCESS_SCHEDULER_ID = f"scheduler-{secrets.token_hex(4)}"
