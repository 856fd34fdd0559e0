"""Command lines: thin `main()`s over the library and the workflows, installed as console scripts
(`nemo-neo-convert`, `nemo-neo-prune`, `nemo-neo-export-fp8`, `nemo-neo-throughput`, `nemo-neo-eval`;
see pyproject.toml). Each switches on the compatibility layer and turns a `UserError` into one
``error:`` line (exit 2)."""
