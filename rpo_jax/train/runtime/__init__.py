"""Where host data and processes meet the devices: this process's rows → global arrays on the mesh
(`global_batches`), packed rows (`packed_rows`), multi-host start-up (`processes`), XLA:CPU's step memory
(`cpu_memory`), and what the devices do (`performance`: the FLOP model, device memory, throughput and MFU).
"""
