"""Registries of names (``mgt.hub.registry``): built-ins imported on first use, plugins from real entry points.

Each test installs a small distribution of its own (a ``*.dist-info`` folder with ``entry_points.txt`` and
its module) on ``sys.path``, which is what ``pip install`` leaves behind, and reads it through a fresh
``Registry`` so the process-wide registries stay as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mgt.hub import loading
from mgt.hub.registry import PluginError, Registry


def install(root: Path, entry_points: str, modules: dict[str, str], name: str = "fake-plugin") -> None:
    """Write distribution ``name`` 1.0 into ``root``: its metadata, ``entry_points.txt`` and ``modules``."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on ``sys.path`` to install distributions into; their modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("fake_"):
            del sys.modules[name]


def test_builtins_are_imported_on_first_use(site):
    (site / "fake_builtin.py").write_text("VALUE = ['built in']\n")
    registry = Registry("widget", "maskray.test-widgets", {"w": "fake_builtin:VALUE"})
    assert registry.names() == ["w"] and "w" in registry and "fake_builtin" not in sys.modules
    assert registry.get("w") == ["built in"] and registry.get("w") is sys.modules["fake_builtin"].VALUE


def test_plugins_come_from_entry_points(site):
    install(site, "[maskray.test-widgets]\nplugged = fake_widgets:make\n",
            {"fake_widgets": "def make(**options):\n    return ('made', options)\n"})
    registry = Registry("widget", "maskray.test-widgets", {})
    assert registry.names() == ["plugged"] and "fake_widgets" not in sys.modules  # names need no import
    assert registry.get("plugged")(size=2) == ("made", {"size": 2})


def test_unknown_names_list_the_registered_ones(site):
    registry = Registry("widget", "maskray.test-widgets", {"a": "fake_x:A", "b": "fake_x:B"})
    with pytest.raises(ValueError, match="unknown widget 'c'; known widgets: a, b"):
        registry.get("c")


def test_a_broken_plugin_names_its_entry_point_and_distribution(site):
    install(site, "[maskray.test-widgets]\nbroken = fake_missing.module:thing\nbad-attr = fake_present:nothing\n",
            {"fake_present": "VALUE = 1\n"})
    registry = Registry("widget", "maskray.test-widgets", {})
    with pytest.raises(PluginError, match=r"widget 'broken' \(entry point 'broken = fake_missing.module:thing' of "
                       r"distribution fake-plugin 1.0 \(group maskray.test-widgets\)\) failed to load: "
                       r"ModuleNotFoundError: No module named 'fake_missing'"):
        registry.get("broken")
    with pytest.raises(PluginError, match="'bad-attr = fake_present:nothing'.*AttributeError"):
        registry.get("bad-attr")


def test_one_name_one_source(site):
    install(site, "[maskray.test-widgets]\nw = fake_one:W\nshared = fake_one:S\n", {}, name="first-plugin")
    registry = Registry("widget", "maskray.test-widgets", {"w": "fake_builtin:W"})
    with pytest.raises(PluginError, match="first-plugin 1.0.*declares widget 'w', which maskray's built-in "
                       "fake_builtin:W declares too"):
        registry.names()
    install(site, "[maskray.test-widgets]\nshared = fake_two:S\n", {}, name="second-plugin")
    with pytest.raises(PluginError, match="declares widget 'shared', which entry point 'shared = fake_"):
        Registry("widget", "maskray.test-widgets", {}).names()
    runtime = Registry("widget", "maskray.test-other-widgets", {"w": "fake_builtin:W"})
    with pytest.raises(ValueError, match="widget 'w' is already registered \\(by maskray's built-in fake_builtin:W"):
        runtime.register("w", object())


def test_plugin_models_resolve_to_their_folder_or_are_built_once(site, monkeypatch, tmp_path):
    shipped = tmp_path / "shipped-model"
    shipped.mkdir()
    install(site, "[maskray.models]\nfake-shipped = fake_models:SHIPPED\nfake-built = fake_models:build\n"
            "fake-wrong = fake_models:NOT_A_MODEL\n",
            {"fake_models": f"from pathlib import Path\nSHIPPED = Path({str(shipped)!r})\nNOT_A_MODEL = 3\n"
                            "BUILDS = []\n\ndef build(folder):\n    BUILDS.append(folder)\n"
                            "    folder.mkdir(parents=True)\n    (folder / 'model_index.json').write_text('{}')\n"})
    monkeypatch.setattr(loading, "MODELS", Registry("model", "maskray.models", {}))
    assert loading.resolve_model_path("fake-shipped") == shipped
    cache = tmp_path / "cache"
    built = loading.resolve_model_path("fake-built", cache=cache)
    assert built == cache / "models" / "fake-built" and (built / "model_index.json").is_file()
    assert loading.resolve_model_path("fake-built", cache=cache) == built
    assert len(sys.modules["fake_models"].BUILDS) == 1
    with pytest.raises(loading.ModelLoadError, match="registered model 'fake-wrong' is a int; a registered model is "
                       "a folder"):
        loading.resolve_model_path("fake-wrong")


def test_plugin_commands_join_the_cli(site, monkeypatch, capsys):
    from jobs import cli

    install(site, "[maskray.commands]\nfake-cmd = fake_cmd\nfake-bare = fake_bare\n",
            {"fake_cmd": "HELP = 'Say a number.'\n\ndef add_arguments(parser):\n    parser.add_argument('--x', type=int)\n"
                         "\ndef run(args):\n    print('x is', args.x)\n    return 0\n",
             "fake_bare": "def add_arguments(parser):\n    pass\n\ndef run(args):\n    return 0\n"})
    commands = {name: module for name, (module, _) in cli.COMMANDS.items()}
    monkeypatch.setattr(cli, "COMMAND_MODULES", Registry("command", "maskray.commands", commands))
    assert cli.main(["fake-cmd", "--x", "3"]) == 0 and capsys.readouterr().out == "x is 3\n"
    assert cli.command_help("fake-cmd") == "Say a number."
    with pytest.raises(PluginError, match="plugin command 'fake-bare' \\(fake_bare\\) defines no HELP string"):
        cli.build_parser()
