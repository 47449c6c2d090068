"""The core: value types (months, symbols, layouts, parameters, jobs) and the compiled kernels.

Nothing here touches a database or a file: the rest of bqx is built on these.
"""
