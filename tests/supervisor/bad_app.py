"""An importable module whose attribute is not a Runtime (configuration error)."""

rt = "not a runtime"
