"""One module per pipeline stage; each exposes `run(params) -> metrics`."""
