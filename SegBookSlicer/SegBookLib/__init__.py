"""SegBook's Slicer module library: one class per file; logic without Qt so it runs on slicer-core."""
