"""The run configuration: recipe defaults (`defaults.base_config`), `--from-trl` (`from_trl`) and the
quickstart recipe (`quickstart`).
"""
