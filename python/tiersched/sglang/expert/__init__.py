"""Expert-tier adapter: `--eplb-algorithm source_aware` in upstream's EPLB manager."""
