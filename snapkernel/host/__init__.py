"""What the daemon reads of its host: the GPUs (NVML) and process trees (/proc). Below the backend and the
snapshots, which both need it, so neither has to import the other's way."""
