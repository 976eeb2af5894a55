"""The job queue: one interface (`base`), an in-process backend (`memory`) and a Redis backend (`redis`)."""
