"""RecDConfig: the flag string, $RECD_PLUGIN and TOML spell the same schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from recd_plugin import ENV_VAR, ConfigError, FeatureGroup, RecDConfig

FLAG = (
    "groups.user.key=session_id; groups.user.features=user_id,user_age,history; "
    "groups.item.features=item_id,item_genres; "
    "towers.user_tower=user; towers.encoder.layers.0=user; towers.item_tower=item; "
    "verify_batches=3; in_workers=false"
)

TOML_BODY = """\
verify_batches = 3
in_workers = false

[groups.user]
key = "session_id"
features = ["user_id", "user_age", "history"]

[groups.item]
features = ["item_id", "item_genres"]

[towers]
"user_tower" = "user"
"encoder.layers.0" = "user"
"item_tower" = "item"
"""

EXPECTED = RecDConfig(
    enabled=True,
    groups=[
        FeatureGroup("user", ("user_id", "user_age", "history"), key="session_id"),
        FeatureGroup("item", ("item_id", "item_genres")),
    ],
    towers={"user_tower": "user", "encoder.layers.0": "user", "item_tower": "item"},
    verify_batches=3,
    in_workers=False,
)


def _nest_under_recd(body: str) -> str:
    """The same config as a [recd] table inside a bigger project file."""
    out = []
    for line in body.splitlines():
        if line.startswith("[") and not line.startswith("[["):
            line = "[recd." + line[1:]
        out.append(line)
    head, _, rest = "\n".join(out).partition("\n\n")
    return (
        '[project]\nname = "my-recsys"\nversion = "1.0"\n\n'
        "[tool.other]\nverify_batches = \"not ours\"\n\n"
        f"[recd]\n{head}\n\n{rest}\n\n"
        "[training]\nepochs = 3\n"
    )


def test_flag_env_and_toml_give_equal_configs(tmp_path: Path) -> None:
    bare = tmp_path / "recd.toml"
    bare.write_text(TOML_BODY)
    project = tmp_path / "project.toml"
    project.write_text(_nest_under_recd(TOML_BODY))

    from_flag = RecDConfig.from_string(FLAG)
    configs = {
        "flag": from_flag,
        "load(flag)": RecDConfig.load(FLAG, env={}),
        "env": RecDConfig.load(None, env={ENV_VAR: FLAG}),
        "toml bare": RecDConfig.from_toml(bare),
        "toml [recd]": RecDConfig.from_toml(project),
        "flag @file": RecDConfig.from_string(f"@{bare}"),
        "flag path.toml": RecDConfig.from_string(str(project)),
        "env @file": RecDConfig.load(None, env={ENV_VAR: f"@{project}"}),
    }
    for name, config in configs.items():
        assert config == EXPECTED, name
    assert from_flag.towers["encoder.layers.0"] == "user"  # dotted module path kept whole
    assert from_flag.spec.features == ["session_id", "user_id", "user_age", "history", "item_id", "item_genres"]


def test_flag_takes_precedence_over_env() -> None:
    env = {ENV_VAR: "off"}
    assert RecDConfig.load("groups.u.features=a", env=env).enabled
    assert not RecDConfig.load(None, env=env).enabled
    assert RecDConfig.load(None, env={ENV_VAR: "groups.u.features=a"}).groups == [FeatureGroup("u", ("a",))]


def test_environment_is_read_when_env_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "groups.u.key=sid; groups.u.features=hist")
    assert RecDConfig.load().groups == [FeatureGroup("u", ("hist",), key="sid")]
    monkeypatch.delenv(ENV_VAR)
    assert RecDConfig.load() == RecDConfig()


@pytest.mark.parametrize("text", ["off", "OFF", "", "   ", "0", "false", "no", "none"])
def test_off_values_give_disabled_config(text: str) -> None:
    for config in (RecDConfig.from_string(text), RecDConfig.load(text, env={}), RecDConfig.load(None, env={ENV_VAR: text})):
        assert config == RecDConfig()
        assert not config.enabled and config.groups == [] and config.towers == {}
    assert RecDConfig.load(None, env={}) == RecDConfig()


def test_enabled_false_switches_off_without_validation() -> None:
    config = RecDConfig.from_string("enabled=false; towers.x=nowhere")
    assert not config.enabled


def test_flag_details() -> None:
    # One feature (no comma) becomes a one-item list; whitespace and empty items are ignored.
    config = RecDConfig.from_string("  groups.u.features = hist ;; groups.u.key = sid ;  ")
    assert config.groups == [FeatureGroup("u", ("hist",), key="sid")]
    assert config.verify_batches == 1 and config.in_workers is True  # defaults
    # A key-only group is allowed (the key is deduplicated on its own).
    assert RecDConfig.from_string("groups.s.key=sid").groups == [FeatureGroup("s", (), key="sid")]
    # Quotes around a value are stripped.
    assert RecDConfig.from_string("groups.u.key='sid'; groups.u.features=a").groups[0].key == "sid"


@pytest.mark.parametrize("text, pattern", [
    ("group.user.features=a", r"unknown key 'group'.*did you mean 'groups'"),
    ("groups.user.feature=a", r"group 'user': unknown key 'feature'.*did you mean 'features'"),
    ("groups.u.features=a; tower.x=u", r"unknown key 'tower'.*did you mean 'towers'"),
    ("groups.u.features=a; verify_batch=2", r"unknown key 'verify_batch'.*did you mean 'verify_batches'"),
])
def test_unknown_keys_are_named_with_a_suggestion(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RecDConfig.from_string(text)


@pytest.mark.parametrize("text, pattern", [
    ("groups.user.features", r"'groups.user.features' is not key=value"),
    ("groups.u.features=a; oops", r"'oops' is not key=value"),
    ("groups=3; groups.u.features=a", r"sets 'groups.u.features' below a plain value"),
    ("groups.u=x", r"group 'u' must be a table"),
    ("groups=x", r"'groups' must be a table"),
])
def test_malformed_flag_items(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RecDConfig.from_string(text)


@pytest.mark.parametrize("text, pattern", [
    ("groups.u.features=a; verify_batches=-2", r"'verify_batches' must be an integer >= 0, or -1 for every batch; got -2"),
    ("groups.u.features=a; verify_batches=many", r"'verify_batches' must be an integer >= 0, or -1 .*got 'many'"),
    ("groups.u.features=a; verify_batches=true", r"'verify_batches' must be an integer"),
    ("groups.u.features=a; in_workers=1", r"'in_workers' must be true or false, got 1"),
    ("groups.u.features=a; in_workers=yes", r"'in_workers' must be true or false"),
    ("groups.u.features=7", r"group 'u': 'features' must be a list of feature names"),
    ("groups.u.features=a; groups.u.key=7", r"group 'u': 'key' must be a feature name"),
    ("groups.u.features=a,a", r"group 'u' lists a feature twice"),
    ("groups.u.features=a; towers.t=v", r"tower 't' reads group 'v', which is not defined"),
    ("towers.t=u", r"names no feature group"),
])
def test_bad_types_and_values(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RecDConfig.from_string(text)


@pytest.mark.parametrize("body, pattern", [
    ('[recd]\ngroups = ["user"]\n', r"'groups' must be a table"),
    ('[recd.groups.u]\nfeatures = [1, 2]\n', r"'features' must be a list of feature names"),
    ('[recd.groups.u]\nfeatures = ["a"]\n[recd.towers]\nt = 3\n', r"'towers' must map module paths to group names"),
    ('[recd]\nverify_batches = 1.5\n[recd.groups.u]\nfeatures = ["a"]\n', r"'verify_batches' must be an integer"),
    ('[recd]\nin_workers = "true"\n[recd.groups.u]\nfeatures = ["a"]\n', r"'in_workers' must be true or false"),
    ('[recd.groups.u]\nfeatures = ["a"]\nkeys = "sid"\n', r"unknown key 'keys'.*did you mean 'key'"),
    ('[project]\nname = "x"\n', r"unknown key 'project'"),  # no [recd] table: the file is the config
])
def test_bad_toml_content(tmp_path: Path, body: str, pattern: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=pattern):
        RecDConfig.from_toml(path)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[recd\ngroups = \n")
    with pytest.raises(ConfigError, match=r"broken.toml' is not valid TOML"):
        RecDConfig.from_string(f"@{broken}")
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing.toml' does not exist"):
        RecDConfig.from_string(str(missing))
    with pytest.raises(ConfigError, match="does not exist"):
        RecDConfig.load(None, env={ENV_VAR: f"@{missing}"})


def test_enabled_must_be_a_boolean(tmp_path: Path) -> None:
    # Regression: enabled = "false" (a TOML string) used to switch the plugin ON (bool("false")).
    path = tmp_path / "recd.toml"
    path.write_text('[recd]\nenabled = "false"\n[recd.groups.u]\nfeatures = ["a"]\n')
    with pytest.raises(ConfigError, match="'enabled' must be true or false"):
        RecDConfig.from_toml(path)
