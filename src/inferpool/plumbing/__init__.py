"""Process plumbing: settings (the only reader of the environment), the Redis connection, the Celery app,
process tuning, the local pool of processes, and the Prometheus exporter."""
