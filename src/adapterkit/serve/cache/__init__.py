"""Where served adapters come from and where they are kept: roots.py (the store and --adapters folders,
path confinement), tiers.py (disk -> RAM -> slots), adapter_cache.py (the cache the engine reads, keyed
by content fingerprint), stats.py (its counters)."""
