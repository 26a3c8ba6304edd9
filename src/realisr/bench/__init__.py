"""``realisr bench``: benchmark methods and settings on paired (LQ/HQ) or unpaired folders, with a CSV, a JSON
summary and a self-contained HTML report; and the offline real-photo benchmark builder
(:mod:`realisr.bench.data`)."""

from .methods import MethodSetting, MethodSpecError, parse_method, parse_methods

__all__ = ["MethodSetting", "MethodSpecError", "parse_method", "parse_methods", "BenchConfig", "run_benchmark",
           "build_benchmark_data"]


def __getattr__(name):
    if name in ("BenchConfig", "run_benchmark"):
        from . import runner

        return getattr(runner, name)
    if name == "build_benchmark_data":
        from .data import build_benchmark_data

        return build_benchmark_data
    raise AttributeError(name)
