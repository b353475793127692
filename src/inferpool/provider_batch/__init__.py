"""Provider Batch APIs as a path for batch jobs: OpenAI Batch and Anthropic Message Batches, at the
providers' batch price (see ``paths`` for the choice, ``store`` for the state, ``planner`` for the
scheduler's side and ``runner`` for the workers')."""
