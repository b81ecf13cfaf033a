"""Arrow schema of the processed Parquet rows (docs/contracts.md §2): one row per recipe."""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "val", "test")

RECIPE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("partition", pa.string(), nullable=False),
        pa.field("has_image", pa.bool_(), nullable=False),
        pa.field("title_ids", pa.list_(pa.int32())),
        pa.field("ingredient_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("instruction_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("ingredient_labels", pa.list_(pa.int32())),
        pa.field("image_ids", pa.list_(pa.string())),
        pa.field("images", pa.list_(pa.binary())),
        pa.field("title", pa.string()),
        pa.field("ingredients", pa.list_(pa.string())),
        pa.field("instructions", pa.list_(pa.string())),
    ]
)
COLUMNS = tuple(RECIPE_SCHEMA.names)
TOKEN_COLUMNS = ("title_ids", "ingredient_ids", "instruction_ids")  # what the recipe encoder reads
# Columns a training step needs (everything but the raw text and the image ids).
MODEL_COLUMNS = ("has_image", *TOKEN_COLUMNS, "ingredient_labels", "images")
# Columns evaluation embeds (labels and raw text are not read).
EVAL_COLUMNS = ("id", "has_image", *TOKEN_COLUMNS, "images")


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Row dicts -> a table with exactly :data:`RECIPE_SCHEMA` (types fixed even for empty lists)."""
    return pa.Table.from_pylist(rows, schema=RECIPE_SCHEMA)


def check_schema(schema: pa.Schema) -> list[str]:
    """Differences between ``schema`` and :data:`RECIPE_SCHEMA` (empty when they match)."""
    problems = []
    for field in RECIPE_SCHEMA:
        if field.name not in schema.names:
            problems.append(f"missing column {field.name}")
        elif not schema.field(field.name).type.equals(field.type):
            problems.append(f"{field.name}: {schema.field(field.name).type} != {field.type}")
    problems += [f"unexpected column {n}" for n in schema.names if n not in RECIPE_SCHEMA.names]
    return problems
