"""Files in and out: TIFF discovery and reading, z positions, export."""
