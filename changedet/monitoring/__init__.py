"""Monitoring an area over time (``changedet monitor``): every clear acquisition of a STAC catalog over
an area compared with a per-pixel baseline, changes confirmed by persistence, the date each first
appeared, per-zone hectares and alerts. See :func:`changedet.monitoring.run.monitor_area`."""
