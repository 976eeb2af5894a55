"""IRG Server: the HTTP API, the job queue, GPU workers and the `irg` command line."""
