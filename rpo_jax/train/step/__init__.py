"""The jitted steps: sequence log-probs of a batch (`logprobs`) and the train / eval steps with
gradient accumulation, the optimizer update and the reference sync (`steps`).
"""
