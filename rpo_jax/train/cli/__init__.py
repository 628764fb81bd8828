"""The command lines, thin: parse, validate, call a job — `rpo-train` (`train`), `rpo-export` (`export`),
`rpo-plan` (`plan`), and what they share (`common`: one-line errors, quiet libraries).
"""
