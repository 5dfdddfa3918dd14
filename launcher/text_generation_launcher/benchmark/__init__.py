"""`text-generation-benchmark`: our server against transformers `generate` on the same random-weight model.

Phases run one after another, never two engines at once: transformers (the baseline), our engine in-process,
then the whole served stack (`text-generation-launcher`: HTTP -> router -> gRPC -> shard) driven by streaming
HTTP clients. `report` turns the results into a table, a JSON file and a PNG plot.
"""
