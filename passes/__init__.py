"""The FX passes of awq_compile (installed as `awq_compile.passes`)."""
