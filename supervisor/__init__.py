"""The flood-supervisor command: start-up steps and the arbiter that owns the children."""
