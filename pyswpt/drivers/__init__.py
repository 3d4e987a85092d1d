"""Long-running processes: each module's run(config) is started by `pyswpt run <name>`."""
