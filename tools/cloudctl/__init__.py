"""tools/cloud: a small, real OpenStack on one machine (doc/cloud.md)."""
