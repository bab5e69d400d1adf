"""The worker: supervise a backend, its gateway membership, its status port and metrics.

Wraps ``ichat.backends``; the backends never import it."""
