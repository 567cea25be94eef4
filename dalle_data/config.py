"""Load and validate the pipeline configuration before any work starts."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

from dalle_data import locations
from dalle_data.errors import DalleDataError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "configs" / "config.schema.yaml"
DATASET_NAME = re.compile(r"^[a-z0-9]+$")


class ConfigError(DalleDataError):
    """A configuration value a user must fix; the message names the key and the fix."""


def validate_dataset_name(name: str) -> str:
    """Refuse names that would break lineage names (`-`, `_`, `.` separate their parts)."""
    if not DATASET_NAME.match(name):
        raise ConfigError(
            f"dataset name {name!r} is invalid: use lower-case letters and digits only "
            "([a-z0-9]+), because '-', '_' and '.' separate the parts of checkpoint names"
        )
    return name


def validate(config: dict[str, Any], schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """Validate ``config`` against the JSON schema and fill schema defaults in place."""
    for name in config.get("datasets") or {}:
        validate_dataset_name(str(name))
    import jsonschema  # only where a config is validated: `dalle-data --help` stays quick

    schema = _schema(schema_path)
    coerce(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
            lines.append(f"config key {key}: {error.message}")
        raise ConfigError(
            "invalid configuration (see configs/config.yaml for every key):\n  "
            + "\n  ".join(lines)
        )
    for name, dataset in config["datasets"].items():
        _check_format_keys(name, dataset)
    _fill_defaults(config, schema, schema)
    _check_locations(config)
    _expand_output_dir(config)
    _check_dedup_against(config["datasets"])
    return config


def _check_dedup_against(datasets: dict[str, Any]) -> None:
    """``dedup_against`` names configured datasets and never loops back (Snakemake builds
    the named datasets first, so a loop could never start)."""
    for name, settings in datasets.items():
        for other in settings.get("dedup_against", []):
            if other not in datasets or other == name:
                raise ConfigError(
                    f"config key datasets.{name}.dedup_against: {other!r} is "
                    + ("the dataset itself" if other == name else "not a configured dataset")
                    + f": name other datasets ({', '.join(sorted(set(datasets) - {name}))})"
                )

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            loop = " -> ".join([*path[path.index(name) :], name])
            raise ConfigError(
                f"config key dedup_against loops ({loop}): each dataset must be built before "
                "the ones that dedup against it; remove one of these entries"
            )
        for other in datasets[name].get("dedup_against", []):
            visit(other, (*path, name))

    for name in datasets:
        visit(name, ())


# The columns a `table` dataset names, one each; then every key only `table` reads.
TABLE_COLUMNS = (
    "url_column",
    "caption_column",
    "license_column",
    "width_column",
    "height_column",
    "id_column",
)
TABLE_KEYS = (
    *TABLE_COLUMNS,
    *("file_type", "header", "column_names", "keep_columns", "min_values", "max_values"),
)


def _check_format_keys(name: str, dataset: dict[str, Any]) -> None:
    """Keys that only one format reads are refused elsewhere; a folder reads file: URLs."""
    fmt = dataset["format"]
    misplaced = [k for k in TABLE_KEYS if k in dataset and fmt != "table"]
    misplaced += ["caption_lines"] if "caption_lines" in dataset and fmt != "folder" else []
    if misplaced:
        raise ConfigError(
            f"config key datasets.{name}: {', '.join(misplaced)} apply only to "
            f"format: {'folder' if misplaced == ['caption_lines'] else 'table'}, not {fmt}"
        )
    if fmt == "folder" and dataset.setdefault("allow_file_urls", True) is not True:
        raise ConfigError(
            f"config key datasets.{name}.allow_file_urls: a folder dataset reads its images "
            "through file: URLs; remove the key or set it to true"
        )


# JSON schema type -> the Python types a YAML scalar must load as to satisfy it.
_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "array": (list,),
    "object": (dict,),
}


def coerce(node: Any, schema: dict[str, Any], root: dict[str, Any]) -> Any:
    """Turn strings into the values the schema wants, in place; returns the coerced node.

    Snakemake's ``--config key=value`` parses nested values with YAML's BaseLoader, so
    ``datasets='{cc12m: {fraction: 0.01}}'`` arrives with ``'0.01'``: a string where the
    schema wants a non-string type is loaded as YAML and kept when it then fits.
    """
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(node, str):
        types = schema.get("type")
        wanted = [types] if isinstance(types, str) else list(types or [])
        if wanted and "string" not in wanted:
            try:
                value = yaml.safe_load(node)
            except yaml.YAMLError:
                return node
            fits = any(
                isinstance(value, _TYPES[t]) and not (t != "boolean" and isinstance(value, bool))
                for t in wanted
                if t in _TYPES
            )
            return coerce(value, schema, root) if fits else node
        return node
    if isinstance(node, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in node.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                node[key] = coerce(value, sub, root)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        node[:] = [coerce(v, schema["items"], root) for v in node]
    for alternative in schema.get("oneOf", []) + schema.get("anyOf", []):
        if not isinstance(node, str):
            break
        node = coerce(node, alternative, root)
    return node


# Bucket schemes an output_dir may have: those with a Snakemake storage plugin in the
# `storage` extra (snakemake-storage-plugin-s3, -gcs), which moves the finished shards.
PIPELINE_BUCKETS = frozenset({"s3", "gs", "gcs"})


def _check_locations(config: dict[str, Any]) -> None:
    """A bucket output_dir needs a Snakemake storage plugin; storage options hold no secret."""
    try:
        locations.normalize(config["output_dir"])
        locations.check_options(config["storage_options"], "config key storage_options")
    except locations.LocationError as err:
        raise ConfigError(f"config key output_dir or storage_options: {err}") from None
    bucket = locations.scheme(config["output_dir"])
    if bucket and bucket not in PIPELINE_BUCKETS:
        raise ConfigError(
            f"config key output_dir: the pipeline cannot write to {config['output_dir']} "
            f"({bucket}:// has no Snakemake storage plugin): use a local folder or an s3:// "
            "or gs:// bucket URL, then `dalle-data put` the shards folder or "
            "`dalle-data publish` a checkpoint to an hf:// location"
        )


def local_output_dir(config: dict[str, Any]) -> str:
    """Where the stages write: output_dir, or work_dir when output_dir is a bucket URL."""
    return config["work_dir"] if locations.is_remote(config["output_dir"]) else config["output_dir"]


def bucket_output_dir(config: dict[str, Any]) -> str | None:
    """The bucket URL finished shards go to, or None when output_dir is a local folder."""
    return config["output_dir"].rstrip("/") if locations.is_remote(config["output_dir"]) else None


# libyaml's parser where PyYAML was built with it: the schema takes 24 ms to parse in pure
# Python and 4 ms in C, at every Snakemake start and every stage server's.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _read_schema(schema_path: Path) -> dict[str, Any]:
    return yaml.load(schema_path.read_text(), Loader=_SAFE_LOADER)


def _schema(schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    return copy.deepcopy(_read_schema(schema_path))


def schema_default(*keys: str) -> Any:
    """The schema's default for a key path (``"filters", "min_words"``): command-line
    options take their defaults from here, so the schema is the only place they live."""
    node = _read_schema(SCHEMA_PATH)
    for key in keys:
        node = node["properties"][key]
    return copy.deepcopy(node["default"])


def dataset_default(key: str) -> Any:
    """The schema's default for a key every dataset may set (``eval_fraction``, ...)."""
    return copy.deepcopy(
        _read_schema(SCHEMA_PATH)["$defs"]["dataset"]["properties"][key]["default"]
    )


OUTPUT_DIR = "{output_dir}"


def _expand_output_dir(config: dict[str, Any]) -> None:
    """Replace ``{output_dir}`` in paths, so moving output_dir moves every built input too
    (to the local work_dir when output_dir is a bucket)."""
    out = local_output_dir(config)

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(OUTPUT_DIR, out)
        if isinstance(value, list):
            return [expand(v) for v in value]
        return value

    config["tokenizer"] = expand(config["tokenizer"])
    for dataset in config["datasets"].values():
        for key in ("source", "subset", "tokenizer"):
            if key in dataset:
                dataset[key] = expand(dataset[key])
    train = config.get("train") or {}
    for key in ("parent", "output_dir", "vqgan_model_path", "vqgan_config_path"):
        if key in train:
            train[key] = expand(train[key])


def _fill_defaults(node: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(node, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = sub["default"]
        if key in node:
            _fill_defaults(node[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in node.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra, root)


def load(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    return validate(yaml.load(Path(path).read_text(), Loader=_SAFE_LOADER) or {})


def tokenizer_file(spec: str) -> str | None:
    """The file a tokenizer spec names (``hug:<path>``, ``yttm:<path>``); None for ``simple``
    and for specs that do not parse (loading them says what is wrong)."""
    kind, sep, location = spec.partition(":")
    return location if sep and kind in ("hug", "yttm") and location else None
