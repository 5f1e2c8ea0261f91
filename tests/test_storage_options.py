"""
Tests of storage options: the decorator's, RESUMABLE_STORAGE_OPTIONS and the command
line's ``-o KEY=VALUE`` merge key by key and reach fsspec; a missing backend names
the extra to install; runs and ``ls`` work on s3:// through options alone.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import attrs
import fsspec
import pytest

import resumable
from resumable import _cli
from resumable._settings import Settings
from resumable._storage import Storage
from resumable.errors import ConfigurationError, StorageError
from tests.s3server import S3Server

SCRIPTS = Path(__file__).parent / "scripts"
VARIABLE = "RESUMABLE_STORAGE_OPTIONS"
# Where s3fs goes when no endpoint reaches it: a closed loopback port, never AWS.
NOWHERE = "http://127.0.0.1:9"


# main() runs in this process: undo what it changes.
pytestmark = pytest.mark.usefixtures("cli_undone")


@attrs.define
class Empty:
    pass


def noop(state: Empty, step: int) -> None:
    return None


declared = resumable.step(
    init=Empty, steps=1, storage_options={"anon": False, "profile": "decorator"}
)(noop)


@pytest.fixture
def s3_only_by_options(s3_server: S3Server, monkeypatch) -> S3Server:
    """The S3 server, reachable only through options given to resumable."""
    monkeypatch.delitem(fsspec.config.conf, "s3")
    monkeypatch.delenv("FSSPEC_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", NOWHERE)

    return s3_server


def test_decorator_options_are_the_base() -> None:
    """The decorator's storage_options are used where nothing else is given."""
    settings = Settings.resolve(declared)

    assert {"anon": False, "profile": "decorator"} == settings.storage_options


def test_variable_and_argument_add_to_the_decorator_key_by_key(monkeypatch) -> None:
    """RESUMABLE_STORAGE_OPTIONS overrides the decorator, the argument both."""
    monkeypatch.setenv(VARIABLE, '{"profile": "variable", "region_name": "eu"}')

    settings = Settings.resolve(declared, storage_options={"region_name": "us"})

    expected = {"anon": False, "profile": "variable", "region_name": "us"}
    assert expected == settings.storage_options


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", '"text"'])
def test_variable_that_is_no_json_object_is_a_configuration_error(
    monkeypatch, value: str
) -> None:
    """A RESUMABLE_STORAGE_OPTIONS that is not a JSON object names the variable."""
    monkeypatch.setenv(VARIABLE, value)

    with pytest.raises(ConfigurationError) as caught:
        Settings.resolve(declared)

    assert VARIABLE in str(caught.value)


@pytest.mark.parametrize("options", [["a", "b"], {1: "x"}, "endpoint"])
def test_decorator_options_must_be_a_mapping_of_names(options: Any) -> None:
    """storage_options of the wrong shape fail at declaration, naming the value."""
    with pytest.raises(ConfigurationError) as caught:
        resumable.step(init=Empty, steps=1, storage_options=options)(noop)

    assert "storage_options" in str(caught.value)


def test_options_reach_fsspec(tmp_path: Path) -> None:
    """The options are passed to the fsspec file system of the URL."""
    url = f"file://{tmp_path}/store"

    storage = Storage.open(url, {"auto_mkdir": False})

    assert storage.fs.storage_options == {"auto_mkdir": False}


def test_a_missing_backend_names_the_extra_to_install(monkeypatch) -> None:
    """An s3:// URL without s3fs says to install resumable[s3]."""
    monkeypatch.setitem(sys.modules, "s3fs", None)
    registry = sys.modules["fsspec.registry"]._registry  # s3 may be registered
    monkeypatch.delitem(registry, "s3", raising=False)

    with pytest.raises(ConfigurationError) as caught:
        Storage.open("s3://bucket/run")

    assert "pip install 'resumable[s3]'" in str(caught.value)
    assert "s3fs" in str(caught.value)


def test_cli_options_run_and_list_on_s3(s3_only_by_options, tmp_path, capsys) -> None:
    """-o options alone take a run and ls to an S3 endpoint; JSON values parse."""
    server = s3_only_by_options
    bucket = "options-cli"
    fsspec.filesystem("s3", **server.options).mkdir(bucket)
    script = tmp_path / "cli_train.py"
    shutil.copy(SCRIPTS / "cli_train.py", script)
    options = [f"-o{name}={value}" for name, value in server.options.items()]
    url = f"s3://{bucket}/run"

    code = _cli.main([str(script), "--storage", url, *options, "-o", "use_ssl=false"])
    listed = _cli.main(["ls", url, *options])
    out = capsys.readouterr().out

    assert (0, 0) == (code, listed)
    assert 3 == out.count("cli_train.py:train / step-0000000")


def test_variable_options_take_ls_to_s3(s3_only_by_options, monkeypatch, capsys):
    """RESUMABLE_STORAGE_OPTIONS reaches ls too."""
    server = s3_only_by_options
    bucket = "options-variable"
    fsspec.filesystem("s3", **server.options).mkdir(bucket)
    monkeypatch.setenv(VARIABLE, json.dumps(server.options))

    code = _cli.main(["ls", f"s3://{bucket}/run"])

    assert 0 == code
    assert "no snapshots at s3://" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["-o", "-okey", "-o=value"])
def test_malformed_cli_option_exits_2(tmp_path, capsys, option: str) -> None:
    """An -o that is not KEY=VALUE is a usage error."""
    with pytest.raises(SystemExit) as caught:
        _cli.main(["script.py", option])

    assert 2 == caught.value.code


def test_options_the_backend_rejects_are_a_configuration_error(s3_url: str) -> None:
    """An option s3fs does not take fails at open, naming it, not inside training."""
    with pytest.raises(ConfigurationError) as caught:
        Storage.open(s3_url, {"endpont_url": "http://127.0.0.1:9"})

    assert "endpont_url" in str(caught.value)
    assert "-o KEY=VALUE" in str(caught.value)


def test_a_missing_bucket_is_an_error_and_never_created(s3_server: S3Server) -> None:
    """A bucket that does not exist is reported, not created (a typo would be)."""
    with pytest.raises(StorageError) as caught:
        Storage.open("s3://no-such-bucket-of-ours/run")

    assert "does not exist" in str(caught.value)
    assert not fsspec.filesystem("s3").exists("no-such-bucket-of-ours")


def test_a_url_with_one_slash_after_its_scheme_is_refused() -> None:
    """s3:/bucket would be a local folder named 's3:'; it is refused."""
    with pytest.raises(ConfigurationError) as caught:
        Storage.open("s3:/bucket/run")

    assert "two slashes" in str(caught.value)


def test_ls_with_options_the_backend_rejects_exits_5(s3_url: str, capsys) -> None:
    """ls reports the backend's own error in one line instead of a traceback."""
    code = _cli.main(["ls", s3_url, "-o", "endpont_url=http://127.0.0.1:9"])

    assert 5 == code
    assert "cannot list" in capsys.readouterr().err
