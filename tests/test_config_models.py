"""Every typed config model documents and defaults each field, and rejects unknown keys."""

import importlib
import pkgutil

import pytest
from pydantic import BaseModel

PACKAGES = ("mgt", "actors", "pipeline", "jobs")


def config_models() -> list[type[BaseModel]]:
    found = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if (isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == info.name
                        and value.model_config.get("extra") == "forbid"):
                    found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[name] for name in sorted(found)]


MODELS = config_models()


def test_the_shared_configs_are_found():
    names = {model.__name__ for model in MODELS}
    assert {"SamplerConfig", "ModelConfig", "GenerationSettings"} <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_described_and_configs_have_defaults(model):
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"
        if model.__name__.endswith(("Config", "Settings")):  # request bodies may have required fields
            assert not field.is_required(), f"{model.__name__}.{name} has no default"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_unknown_keys_are_rejected(model):
    with pytest.raises(ValueError, match="not_a_field"):
        model.model_validate({"not_a_field": 1})
