"""Everything bqx keeps in PostgreSQL, and the only modules that hold SQL:

- ``names``: quoted identifiers of every table, partition and column;
- ``ddl``: schema, source and target tables, monthly partitions;
- ``catalog``: what exists (tables, columns, partitions, keys), read from the catalog;
- ``ledger``: runs, jobs, attempts and target parameters (the only module that names them);
- ``versions``: per-month versions of source bars, kept by triggers, and job signatures;
- ``bars``: source bars in (load, merge, delete) and out (a job's series);
- ``targets``: metric rows in (replace a month, upsert a range) and out (reads, counts).
"""
