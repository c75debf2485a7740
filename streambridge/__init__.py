"""streambridge: the CLI that composes api and workers, the typed client, and the simulated LLM."""
