"""The console scripts: one module per command, and the argument helpers they share."""
