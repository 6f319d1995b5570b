"""Reading the template as AWS would deploy it: its parameters, the SAM transform's output with
the false conditions' resources left out, the roles' statements, and each function's
environment as SAM resolves it."""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from local.template import ROOT, load_template


def parameters() -> dict[str, Any]:
    params: dict[str, Any] = load_template()["Parameters"]
    return params


@lru_cache(maxsize=8)
def _transformed(overrides: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    from samcli.lib.translate.sam_template_validator import SamTemplateValidator
    from samcli.yamlhelper import yaml_parse

    class NoManagedPolicyNames:  # the template names managed policies by ARN only
        def load(self) -> dict[str, str]:
            return {}

    validator = SamTemplateValidator(
        yaml_parse((ROOT / "template.yaml").read_text()),
        NoManagedPolicyNames(),
        region="us-east-1",
        parameter_overrides=dict(overrides),
        language_extensions_enabled=True,
    )
    result: dict[str, Any] = yaml_parse(validator.get_translated_template_if_valid())
    return result


def transformed(overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """The template as the SAM transform expands it (what CloudFormation deploys)."""
    return copy.deepcopy(_transformed(tuple(sorted((overrides or {}).items()))))


def deployed(overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """The transformed template as CloudFormation creates it: the resources whose Condition
    is false left out (the transform has put the parameters' values into the conditions)."""
    template = transformed(overrides)
    conditions = template.get("Conditions", {})

    def holds(expression: Any) -> bool:
        [(name, args)] = expression.items()
        if name == "Condition":
            return holds(conditions[args])
        if name == "Fn::Equals":
            assert all(isinstance(a, str) for a in args), expression  # resolved values
            return bool(args[0] == args[1])
        if name == "Fn::Not":
            return not holds(args[0])
        if name == "Fn::And":
            return all(holds(a) for a in args)
        if name == "Fn::Or":
            return any(holds(a) for a in args)
        raise AssertionError(f"not a condition function: {name}")

    template["Resources"] = {
        name: resource
        for name, resource in template["Resources"].items()
        if "Condition" not in resource or holds(conditions[resource["Condition"]])
    }
    return template


def role_of(function: str, template: dict[str, Any]) -> dict[str, Any]:
    role = template["Resources"][function]["Properties"]["Role"]
    properties: dict[str, Any] = template["Resources"][role["Fn::GetAtt"][0]]["Properties"]
    return properties


def statements_of(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for p in role.get("Policies", []) for s in p["PolicyDocument"]["Statement"]]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def sam_environments(overrides: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each function's environment as SAM resolves it (parameters and Globals merged)."""
    from samcli.lib.providers.sam_function_provider import SamFunctionProvider
    from samcli.lib.providers.sam_stack_provider import SamLocalStackProvider

    stacks, _ = SamLocalStackProvider.get_stacks(
        str(ROOT / "template.yaml"), parameter_overrides=overrides
    )
    return {
        fn.name: (fn.environment or {}).get("Variables", {})
        for fn in SamFunctionProvider(stacks).get_all()
    }
