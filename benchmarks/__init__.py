"""pagewire benchmarks: the serving load generator (`pagewire bench serve`) and the CPU comparison."""
