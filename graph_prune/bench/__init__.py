"""Benchmarks: latency, throughput, memory and size of models under XLA and ONNX Runtime."""
