"""The site's generated reference pages (docs/ext/generated_pages.py) against the code they are generated from: the
config page lists exactly the schema's keys, the loss table every registered loss, the CLI page every console
script; and the committed pages include the generated ones."""

from __future__ import annotations

import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
sys.path.insert(0, str(DOCS / "ext"))

import generated_pages  # noqa: E402


def _leaf_keys(section, prefix="config") -> list[str]:
    """Every leaf key of the schema, walked from the pydantic models (independently of the page's generator)."""
    from pydantic import BaseModel

    keys = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        key = f"{prefix}.{name}"
        if isinstance(value, BaseModel):
            keys += _leaf_keys(value, key)
            continue
        keys.append(key)
        item = _tuple_item_model(field.annotation)
        if item is not None:
            keys += _leaf_keys(item(), f"{key}[i]")
    return keys


def _tuple_item_model(annotation):
    import typing

    from pydantic import BaseModel

    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def test_the_config_page_lists_exactly_the_schemas_keys():
    from rpo_jax.train.config.schema import RunConfig

    page = generated_pages.config_reference()
    on_page = re.findall(r"^`(config\.[^`]+)`$", page, flags=re.M)
    assert len(on_page) == len(set(on_page))
    assert sorted(on_page) == sorted(_leaf_keys(RunConfig()))


def test_every_key_of_the_recipes_base_config_is_on_the_page():
    from rpo_jax.train import base_config

    def flat(c, prefix="config"):
        out = []
        for k, v in c.items():
            if hasattr(v, "items") and k not in ("init", "hparams", "kwargs"):
                out += flat(v, f"{prefix}.{k}")
            else:
                out.append(f"{prefix}.{k}")
        return out

    on_page = set(re.findall(r"^`(config\.[^`]+)`$", generated_pages.config_reference(), flags=re.M))
    assert sorted(set(flat(base_config())) - on_page) == []


def test_every_key_has_its_own_link_target():
    page = generated_pages.config_reference()
    targets = re.findall(r"^\(([a-z0-9-]+)\)=$", page, flags=re.M)
    assert len(targets) == len(set(targets)) == len(generated_pages.config_rows())
    assert "config-data-share-prompt" in targets


def test_every_config_row_has_a_type_default_and_description():
    for row in generated_pages.config_rows():
        assert row["type"] and row["description"], row
        assert row["default"] or row["type"].startswith("list of {"), row


def test_the_loss_table_lists_every_registered_loss():
    from rpo_jax.losses import available_losses

    rows = re.findall(r"^\| `([a-z_0-9]+)` \|", generated_pages.loss_table(), flags=re.M)
    assert rows == available_losses()


def test_the_cli_page_documents_every_console_script():
    scripts = generated_pages.console_scripts()
    assert {"rpo-train", "rpo-plan", "rpo-export", "rpo-data"} <= set(scripts)
    page = generated_pages.cli_reference()
    for name in scripts:
        assert f"# `{name}`" in page and f"usage: {name}" in page, name
    assert "`rpo-data validate`" in page and "--tokenizer" in page
    assert "/work/" not in page and str(generated_pages.ROOT) not in page


def test_the_reference_pages_include_the_generated_ones():
    for name in generated_pages.PAGES:
        text = (DOCS / "reference" / name).read_text()
        assert f"{{include}} generated/{name}" in text, name
