"""Layout config types and their sink builders, as ``ray.data.llm`` maps processor configs to their builders.

Each layout module ends with ``SinkBuilder.register(ItsConfig, builder)``; ``build_sink`` dispatches on the
config's type, and ``layout_config`` turns the ``--layout`` name into that type. A config type or a name
registered twice is refused, and an unknown one is refused with the list of the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from pipeline.sinks.base import ImageSink, LayoutConfig

if TYPE_CHECKING:
    from pipeline.storage import Storage

Builder = Callable[[LayoutConfig, "Storage"], ImageSink]


class SinkBuilder:
    """The registered layouts: config type -> the function that builds its ``ImageSink``."""

    _builders: ClassVar[dict[type[LayoutConfig], Builder]] = {}

    @classmethod
    def register(cls, config_type: type[LayoutConfig], builder: Builder) -> None:
        """Make ``build_sink`` build ``config_type``'s configs with ``builder(config, storage)``.

        Raises:
            ValueError: the type, or another type of the same ``name``, is already registered.
        """
        if config_type in cls._builders:
            raise ValueError(f"layout config {config_type.__name__} is already registered")
        for known in cls._builders:
            if known.name == config_type.name:
                raise ValueError(f"layout {config_type.name!r} of {config_type.__name__} is already registered by "
                                 f"{known.__name__}; give the new layout another name")
        cls._builders[config_type] = builder

    @classmethod
    def build(cls, config: LayoutConfig, storage: Storage) -> ImageSink:
        """The sink of ``config``'s layout writing under ``storage``.

        Raises:
            ValueError: no builder is registered for ``type(config)`` (the message lists the registered types).
        """
        builder = cls._builders.get(type(config))
        if builder is None:
            known = ", ".join(sorted(t.__name__ for t in cls._builders))
            raise ValueError(f"no layout is registered for {type(config).__name__}; registered: {known} "
                             f"(register it with SinkBuilder.register)")
        return builder(config, storage)

    @classmethod
    def config_type(cls, name: str) -> type[LayoutConfig]:
        """The config type registered under the layout ``name``.

        Raises:
            ValueError: no layout has that name (the message lists the known names).
        """
        for config_type in cls._builders:
            if config_type.name == name:
                return config_type
        raise ValueError(f"unknown layout {name!r}; known layouts: {', '.join(cls.names())}")

    @classmethod
    def names(cls) -> list[str]:
        """The registered layout names, sorted."""
        return sorted(t.name for t in cls._builders)

    @classmethod
    def configs(cls) -> list[type[LayoutConfig]]:
        """The registered config types, in registration order."""
        return list(cls._builders)


def layout_config(name: str, image_format: str) -> LayoutConfig:
    """The config of layout ``name`` for images encoded as ``image_format``."""
    return SinkBuilder.config_type(name)(image_format=image_format)


def build_sink(name: str, storage: Storage, image_format: str) -> ImageSink:
    """The sink of layout ``name`` (``--layout``) writing ``image_format`` images under ``storage``."""
    return SinkBuilder.build(layout_config(name, image_format), storage)


def serves_files(name: str) -> bool:
    """Whether layout ``name`` stores every image as a file of its own (``LayoutConfig.serves_files``)."""
    return SinkBuilder.config_type(name).serves_files


def describe_layouts() -> str:
    """``files (one file per sample under images/), ...``: the registered layouts, for ``--layout``'s help."""
    return ", ".join(f"{t.name} ({t.description})" for t in SinkBuilder.configs())
