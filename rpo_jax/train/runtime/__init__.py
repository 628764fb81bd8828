"""Where host data and processes meet the devices: this process's rows → global arrays on the mesh
(`global_batches`), packed rows (`packed_rows`), multi-host start-up (`processes`) and XLA:CPU's step memory
(`cpu_memory`).
"""
