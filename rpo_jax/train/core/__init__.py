"""The run skeleton every job plugs into (`runner`) and what it is made of: the work directory
(`workdir`), the run identity (`identity`), checkpoints (`checkpoint`), metrics (`metrics`), performance
accounting (`performance`) and the export (`export`).
"""
