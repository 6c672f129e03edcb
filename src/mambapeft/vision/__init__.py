"""The vision protocol: image data (VTAB-1k, class folders), the "vision" task and the VTAB-1k run."""
