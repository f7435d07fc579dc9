"""Data pipelines for every PUMA task (grain), the built-in synthetic set, bad-data handling.

`schema` defines the example record (`Example.kind` in `schema.EXAMPLE_KINDS`), `sources` the
file readers, `parse` the per-family parsers, `transforms` crops/resizes/tokenization,
`pipeline.build(cfg.data)` the iterator, `config.get_config()` the `data` ConfigDict,
`synthetic` the built-in shapes set, `rows` examples -> packed MLLM training rows.
"""
