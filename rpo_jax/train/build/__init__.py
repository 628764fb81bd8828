"""What a run is made of, built before its first step: data (`data`), models (`model`), LoRA (`lora`),
the optimizer (`optim`), the train state (`state`), references (`references`) — and the one program builder
(`programs`): the train and eval steps and reference scorers with their abstract arguments, shardings and
donation, called by the trainer, `rpo-plan` and every benchmark.
"""
