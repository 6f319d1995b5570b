"""Stand-in for llama-cpp-python (see ../README.md)."""
