"""Search over your own imagery: index build/add (build), tiling and pixels (sources), footprints (geo), queries (engine), CLI (cli), benchmarks (bench)."""
