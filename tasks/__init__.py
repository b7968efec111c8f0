"""Prefect tasks: thin wrappers, each calling one `kimi_core` function; retries, timeouts and cache
policy are declared in the decorators."""
