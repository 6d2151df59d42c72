"""Test fixtures shipped with the package (synthetic scenes for tests, benchmarks and notebooks); not used by the pipeline."""
