"""DocQA evaluation: the benchmarks of method.md section 5 and l15.md section 6, with the papers' protocol."""

from qwenlong.eval.benchmarks import BENCHMARKS, Benchmark, find_benchmark_files, load_benchmark
from qwenlong.eval.generation import GenerateFn, Sampling, hf_generate_fn, openai_generate_fn, sharded_generate_fn
from qwenlong.eval.harness import BenchmarkResult, EvalReport, evaluate

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkResult", "EvalReport", "GenerateFn", "Sampling", "evaluate",
           "find_benchmark_files", "hf_generate_fn", "load_benchmark", "openai_generate_fn",
           "sharded_generate_fn"]
