"""Tools for the demo, the tests and the benchmarks, never for the nodes: tiny random pipelines of
each family and an exporter that writes diffusers weights as original-layout single-file
checkpoints. The production layers (converters, loaders, nodes) do not import this package."""
