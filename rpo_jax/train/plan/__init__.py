"""`rpo-plan`'s parts: TPU slices and their chips (`slices`), ahead-of-time compilation and XLA's memory
figures (`compile`), what the compiled HLO does (`hlo_analysis`) and the printed report (`report`). The programs
planned come from the one program builder, `rpo_jax.train.build.programs`, via `rpo_jax.train.build.plans`.
"""
