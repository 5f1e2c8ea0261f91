"""
Tests of the public surface: ``__all__`` of ``resumable``, ``resumable.testing``
and ``resumable.errors`` is sorted and complete, and the exception tree matches
the one drawn in the ``errors`` docstring.
"""

from __future__ import annotations

import builtins
import re
import sys
import types
import typing

import pytest

import resumable
import resumable.errors
import resumable.testing

# Submodules that the package exports by name.
EXPORTED_MODULES = {"errors", "testing"}
# Names that ``from __future__ import ...`` binds in a module.
FUTURE_FEATURES = set(sys.modules["__future__"].all_feature_names)


def public_names(module: types.ModuleType, *, defined_in: str) -> list[str]:
    """
    Return the public names of ``module``: no underscore, no module, no
    ``from __future__`` feature or TypeVar, and defined in a module whose name
    starts with ``defined_in`` (so that imported helpers do not count).
    """
    names = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, types.ModuleType):
            if name in EXPORTED_MODULES and module is resumable:
                names.append(name)
            continue
        if name in FUTURE_FEATURES or isinstance(value, typing.TypeVar):
            continue
        origin = getattr(value, "__module__", module.__name__)
        if origin is not None and origin.startswith(defined_in):
            names.append(name)

    return sorted(names)


MODULES = {
    "resumable": (resumable, "resumable"),
    "resumable.testing": (resumable.testing, "resumable.testing"),
    "resumable.errors": (resumable.errors, "resumable.errors"),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_all_is_sorted(name):
    """__all__ is in sorted order, so that additions are easy to review."""
    module, _ = MODULES[name]

    assert sorted(module.__all__) == list(module.__all__)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_all_has_no_duplicates_and_every_name_exists(name):
    """Every name in __all__ is unique and is an attribute of the module."""
    module, _ = MODULES[name]

    assert len(set(module.__all__)) == len(module.__all__)
    assert [] == [item for item in module.__all__ if not hasattr(module, item)]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_all_lists_every_public_name(name):
    """Every public name of the module is in __all__, and nothing else but dunders."""
    module, defined_in = MODULES[name]
    exported = sorted(item for item in module.__all__ if not item.startswith("_"))

    assert public_names(module, defined_in=defined_in) == exported


def test_package_exports_the_documented_api():
    """The package's surface: the decorator, run, load, iterate, transient, errors."""
    expected = [
        "ConfigurationError",
        "IncompatibleSnapshotError",
        "NoProgressError",
        "NoSnapshotError",
        "RankLostError",
        "Result",
        "ResumableError",
        "SnapshotCorruptError",
        "SnapshotError",
        "StateDefinitionError",
        "Step",
        "StorageError",
        "SupersededError",
        "__version__",
        "errors",
        "iterate",
        "load",
        "run",
        "step",
        "testing",
        "transient",
    ]

    assert expected == sorted(resumable.__all__)


def test_package_reexports_every_error_class():
    """Every class in errors.__all__ is the same object at the package's top level."""
    assert [] == [
        name
        for name in resumable.errors.__all__
        if getattr(resumable, name, None) is not getattr(resumable.errors, name)
    ]


def test_testing_exports_the_documented_helpers():
    """resumable.testing offers the helpers that the design promises."""
    expected = [
        "assert_resumes_identically",
        "assert_states_equal",
        "diff_states",
        "memory_storage",
        "run_killed",
        "run_preempted",
        "run_steps",
    ]

    assert expected == resumable.testing.__all__


def drawn_tree() -> dict[str, tuple[str | None, str | None]]:
    """Parse errors.py's docstring: each class, its parent class and its builtin."""
    tree: dict[str, tuple[str | None, str | None]] = {}
    parents: dict[int, str] = {}
    pattern = re.compile(
        r"^(?P<indent>[\s│├└─]*)(?P<name>\w+Error)(?: \((?P<base>\w+)\))?"
    )
    for line in (resumable.errors.__doc__ or "").splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        depth = len(match["indent"])
        parents[depth] = match["name"]
        parent = max((d for d in parents if d < depth), default=None)
        tree[match["name"]] = (
            parents[parent] if parent is not None else None,
            match["base"],
        )

    return tree


def test_docstring_draws_every_error_class():
    """The tree in errors.py's docstring names exactly the classes of errors.__all__."""
    assert sorted(resumable.errors.__all__) == sorted(drawn_tree())


def test_docstring_tree_is_the_documented_one():
    """The drawn tree has the parents and builtins that the style guide requires."""
    expected = {
        "ResumableError": (None, "Exception"),
        "ConfigurationError": ("ResumableError", "ValueError"),
        "StateDefinitionError": ("ResumableError", "TypeError"),
        "SnapshotError": ("ResumableError", None),
        "SnapshotCorruptError": ("SnapshotError", "ValueError"),
        "IncompatibleSnapshotError": ("SnapshotError", "ValueError"),
        "NoSnapshotError": ("SnapshotError", "LookupError"),
        "NoProgressError": ("SnapshotError", "RuntimeError"),
        "StorageError": ("ResumableError", "OSError"),
        "SupersededError": ("ResumableError", "RuntimeError"),
        "RankLostError": ("ResumableError", "RuntimeError"),
    }

    assert expected == drawn_tree()


@pytest.mark.parametrize("name", sorted(resumable.errors.__all__))
def test_error_class_inherits_its_parent_and_builtin_as_drawn(name):
    """Each error class subclasses ResumableError, its drawn parent and builtin."""
    parent, builtin = drawn_tree()[name]
    error = getattr(resumable.errors, name)

    assert issubclass(error, resumable.errors.ResumableError)
    if parent is not None:
        assert issubclass(error, getattr(resumable.errors, parent))
    if builtin is not None:
        assert issubclass(error, getattr(builtins, builtin))


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("ConfigurationError", ValueError),
        ("StateDefinitionError", TypeError),
        ("SnapshotCorruptError", ValueError),
        ("IncompatibleSnapshotError", ValueError),
        ("NoSnapshotError", LookupError),
        ("NoProgressError", RuntimeError),
        ("StorageError", OSError),
        ("SupersededError", RuntimeError),
        ("RankLostError", RuntimeError),
    ],
)
def test_error_can_be_caught_as_its_builtin(name, builtin):
    """Callers that catch the builtin (ValueError, OSError, ...) catch our errors."""
    error = getattr(resumable, name)

    with pytest.raises(builtin):
        raise error("message")


def test_version_is_a_string():
    """The package has a version string."""
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", resumable.__version__)
