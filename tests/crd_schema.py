"""Strict validation of a custom resource against its CRD's schema, from the committed fixtures in fixtures/crds/.

Strict as the API server's field validation (Strict) is: an unknown field is an error, not pruned. What jsonschema
cannot check: the CRDs' CEL rules (x-kubernetes-validations) and the admission webhooks; tests that need one of
those check it themselves.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import yaml

CRD_DIR = Path(__file__).parent / "fixtures" / "crds"


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of every CRD fixture, made strict. Each fixture must say in its
    first lines where it came from, with a version (`Source: ... vX.Y.Z`)."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        text = path.read_text()
        head = text.split("\n---", 1)[0]
        if "Source:" not in head or not re.search(r"v\d+\.\d+\.\d+", head):
            raise ValueError(f"{path.name}: the header must name its source and version")
        for crd in yaml.safe_load_all(text):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                api = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api, crd["spec"]["names"]["kind"])] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def strict(schema: dict) -> dict:
    """A CRD schema that rejects unknown fields instead of pruning them: every object with declared properties gets
    additionalProperties false, unless it preserves unknown fields. metadata stays open (the API server checks it
    as ObjectMeta, which the CRD leaves out)."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("properties") and "additionalProperties" not in node:
                if not node.get("x-kubernetes-preserve-unknown-fields"):
                    node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return schema


def validate(obj: dict) -> None:
    """Raise jsonschema.ValidationError unless `obj` matches its kind's CRD schema (KeyError: no fixture for it)."""
    import jsonschema

    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft7Validator(schema).validate(obj)
