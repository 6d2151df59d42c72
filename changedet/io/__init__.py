"""Raster input (scenes made of band sources) and output (COG writers, GeoPackage)."""
