"""The evaluation layer: per-sample records (`records`), the results report (`report`) and the
lmms-eval plugin (`lmms_plugin`). May import the core and `otprune.hf`/`otprune.analysis`;
never `otprune.bench`, `otprune.commands` or the CLI."""
