"""The run configuration: the typed schema (`schema`: one pydantic section per config group, every field typed,
ranged and described; `values`: the spellings and parsers of its options; `loss_terms`: `config.loss` against
the loss registry), `validation.validate` (a ConfigDict → the frozen `RunConfig`, one-line errors), the recipe
defaults generated from the schema (`defaults.base_config`), `--from-trl` (`from_trl`) and the quickstart recipe
(`quickstart`).
"""
