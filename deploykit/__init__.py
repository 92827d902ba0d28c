"""deploykit: profile a device, predict latency, search and compress under a millisecond budget, export."""
__version__ = "0.1.0"
