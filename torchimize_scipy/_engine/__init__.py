"""The batched least-squares engine: one loop, pluggable step rules."""
