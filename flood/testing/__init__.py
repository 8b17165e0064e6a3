"""What the demo, the tests and the benchmarks start beside Flood: an embedded local S3 server."""
