"""Command lines: thin `main()`s over the library and the workflows, installed as console scripts
(`nemo-neo-convert`, `nemo-neo-prune`, `nemo-neo-export-fp8`, `nemo-neo-export-peft`,
`nemo-neo-throughput`, `nemo-neo-eval`, `nemo-neo-preprocess`; see pyproject.toml). Each turns a
`UserError` into one ``error:`` line (exit 2).

This package is an entry point: importing it switches on the compatibility layer (`nemo_neo._compat`)
before any command module imports megatron-core, so that megatron's import-time notices about
optional accelerators do not reach the command's stderr and the CPU shims are in place.
"""

from nemo_neo import _compat

_compat.enable()
