"""`make bench`: Hermes' benchmark (added latency, memory, DynamoDB requests, slot
utilization, cold start). `python -m bench.run` writes bench/RESULTS.md."""
