"""Type stubs of the Rust extension (kept in sync by mypy.stubtest)."""

__version__: str
