"""What a lowered module calls: custom-call targets, and the ones only jaxlib's CPU has."""

import re

_CALL = re.compile(r"custom_call\s*@([\w.]+)|call_target_name\s*=\s*\"([\w.]+)\"")
# jaxlib's CPU kernels: LAPACK (lapack_*), its FFT (ducc_*), and the CPU FFI targets.
_CPU_ONLY = re.compile(r"^(lapack_|ducc_|cpu_|xla_cpu|blas_)")


def custom_calls(module_text: str) -> list[str]:
  """Every custom-call target of a StableHLO module, in order of appearance."""
  return [a or b for a, b in _CALL.findall(module_text)]


def cpu_only_calls(module_text: str) -> list[str]:
  return [c for c in custom_calls(module_text) if _CPU_ONLY.match(c)]
