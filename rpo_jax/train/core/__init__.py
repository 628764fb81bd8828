"""The run skeleton every job plugs into (`runner`) and what it is made of: the work directory
(`workdir`), the run identity (`identity`), checkpoints (`checkpoint`), metrics (`metrics`) and the export
(`export`).
"""
