"""
Tests of ``resumable._state``: the state declaration checks, its schema, and the
whole snapshot tree (fields, global RNGs, history) through the on-disk layout.
"""

from __future__ import annotations

import json
import math
import random
import threading
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import resumable
from resumable._rng import capture_global_rngs, restore_global_rngs
from resumable._snapshot import buffer_table, buffer_views, data_chunks
from resumable._state import (
    check_capturable,
    check_state,
    decode_snapshot,
    encode_snapshot,
    schema,
)
from resumable.errors import IncompatibleSnapshotError, StateDefinitionError
from resumable.testing import diff_states, memory_storage


@pytest.fixture(autouse=True)
def keep_global_rngs():
    """Leave the global generators as they were, since these tests restore them."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def through_layout(
    content: tuple[dict[str, Any], list[Any]],
) -> tuple[dict[str, Any], list[memoryview]]:
    """Pass a snapshot's tree and buffers through index.json and data.bin."""
    tree, buffers = content
    index = json.dumps({"tree": tree, "buffers": buffer_table(buffers)})
    data = bytearray(b"".join(bytes(chunk) for chunk in data_chunks(buffers)))
    parsed = json.loads(index)

    return parsed["tree"], buffer_views(memoryview(data), parsed["buffers"])


@attrs.define
class TrainState:
    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    numpy_rng: np.random.Generator
    legacy_rng: np.random.RandomState
    python_rng: random.Random
    losses: list[float] = attrs.Factory(list)
    extra: dict[Any, Any] = attrs.Factory(dict)
    loader: Any = resumable.transient()


def make_state(seed: int) -> TrainState:
    """Build a state as init() would, every generator seeded from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(
        torch.linspace(-1, 1, 32).reshape(8, 4), torch.arange(8.0).reshape(8, 1)
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, generator=generator
    )
    return TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        numpy_rng=np.random.default_rng(seed),
        legacy_rng=np.random.RandomState(seed),
        python_rng=random.Random(seed),
        extra={"epoch": 0, (1, "a"): [seed], 3: np.full(2, seed)},
        loader=loader,
    )


def train_epoch(state: TrainState) -> None:
    """One epoch that reads every generator in the state and the global ones."""
    for x, y in state.loader:
        noise = state.numpy_rng.normal() + state.legacy_rng.normal()
        noise += state.python_rng.random() + random.random() + np.random.rand()
        loss = ((state.model(x + torch.rand(1)) - y) ** 2).mean() + noise * 0
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.losses.append(float(loss.detach()) + noise)
    state.scheduler.step()
    state.extra["epoch"] += 1


def test_state_restores_in_place_and_training_continues_identically():
    """After decode, one more epoch gives bit-identical results to the original."""
    original = make_state(0)
    for _ in range(2):
        train_epoch(original)
    content = through_layout(encode_snapshot(original, [{"loss": 1.0}, None]))
    target = make_state(1)
    parameters = list(target.model.parameters())
    generator, loader = target.generator, target.loader

    history = decode_snapshot(target, *content)
    restored_rngs = capture_global_rngs()
    train_epoch(original)
    restore_global_rngs(restored_rngs)
    train_epoch(target)

    assert [{"loss": 1.0}, None] == history
    assert [] == diff_states(original, target)
    assert all(
        before is after
        for before, after in zip(parameters, target.model.parameters(), strict=True)
    )
    assert target.optimizer.param_groups[0]["params"][0] is parameters[0]
    assert (target.generator, target.loader) == (generator, loader)
    assert target.loader.generator is target.generator


def test_optimizer_linked_to_restored_parameters_updates_them():
    """The optimizer init() built still steps the restored model's parameters."""
    original = make_state(0)
    train_epoch(original)
    content = through_layout(encode_snapshot(original, []))
    target = make_state(1)
    decode_snapshot(target, *content)
    weight = next(target.model.parameters())
    before = weight.detach().clone()

    train_epoch(target)

    assert not torch.equal(before, weight.detach())
    assert 2 * len(original.loader) == int(target.optimizer.state[weight]["step"])


def test_global_rngs_are_captured_and_restored():
    """Python's, numpy's and torch's global generators continue from the snapshot."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal(3)  # leaves a cached Gaussian in numpy's state
    state = make_state(0)
    content = through_layout(encode_snapshot(state, []))
    expected = [random.random(), np.random.standard_normal(), float(torch.rand(1))]
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)

    decode_snapshot(make_state(5), *content)

    actual = [random.random(), np.random.standard_normal(), float(torch.rand(1))]
    assert expected == actual


def test_transient_fields_are_not_snapshotted_and_keep_inits_value():
    """A transient field is absent from the tree and keeps the value init() gave."""
    original = make_state(0)
    tree, _ = encode_snapshot(original, [])
    target = make_state(1)
    loader = target.loader

    decode_snapshot(target, *through_layout(encode_snapshot(original, [])))

    assert "loader" not in tree["state"]
    assert target.loader is loader


def test_schema_names_the_class_and_the_snapshotted_fields():
    """The schema is the class name and the non-transient fields, in order."""
    expected = {
        "class": "TrainState",
        "fields": [
            "model",
            "optimizer",
            "scheduler",
            "generator",
            "numpy_rng",
            "legacy_rng",
            "python_rng",
            "losses",
            "extra",
        ],
    }

    assert expected == schema(make_state(0))


@attrs.define
class Small:
    value: Any = None


@pytest.mark.parametrize(
    "value",
    [{"a": 1}, None, [Small()], Small, object()],
    ids=["dict", "None", "list", "class", "object"],
)
def test_state_that_is_not_an_attrs_instance_is_refused(value):
    """check_state refuses anything but an instance of an attrs class."""
    with pytest.raises(StateDefinitionError, match="attrs") as caught:
        check_state(value, "init()")

    assert "init() returned a" in str(caught.value)


def test_run_refuses_an_init_that_returns_no_attrs_instance():
    """A run whose init() returns a dict fails before any step runs."""
    calls = []

    @resumable.step(init=lambda: {"weights": [1.0]}, steps=2)
    def train(state, step):
        calls.append(step)

    with pytest.raises(StateDefinitionError, match="attrs"):
        train.run(storage=memory_storage())

    assert [] == calls


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"lock": threading.Lock()}, "state.value['lock']"),
        ([Small(threading.Event())], "state.value[0].value"),
    ],
    ids=["dict", "attrs-in-list"],
)
def test_capture_check_names_the_attribute_that_cannot_be_pickled(value, path):
    """The start-up dry run says which attribute cannot be captured and what to do."""
    with pytest.raises(StateDefinitionError) as caught:
        check_capturable(Small(value))

    message = str(caught.value)
    assert path in message
    assert "transient" in message


def test_run_checks_capture_before_any_step():
    """An un-picklable field stops the run before the first step, not at a snapshot."""
    calls = []

    @resumable.step(init=lambda: Small({"lock": threading.Lock()}), steps=3)
    def train(state, step):
        calls.append(step)

    with pytest.raises(StateDefinitionError, match=r"state\.value\['lock'\]"):
        train.run(storage=memory_storage())

    assert [] == calls


class BrokenStateDict:
    """A user object whose state_dict() raises."""

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("no state today")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_capture_check_turns_other_failures_into_state_definition_errors():
    """A state_dict() that raises is reported as a StateDefinitionError."""
    with pytest.raises(StateDefinitionError, match="no state today"):
        check_capturable(Small(BrokenStateDict()))


def test_module_that_does_not_fit_the_snapshot_is_refused_with_the_key_diff():
    """Restoring into a model of another structure names missing/unexpected keys."""
    original = Small(nn.Linear(2, 2))
    content = through_layout(encode_snapshot(original, []))

    with pytest.raises(IncompatibleSnapshotError) as caught:
        decode_snapshot(Small(nn.Sequential(nn.Linear(2, 2))), *content)

    message = str(caught.value)
    assert "state.value" in message
    assert '"0.weight"' in message
    assert '"weight"' in message


@pytest.mark.parametrize(
    "tree", [{}, {"state": {}}, [], {"state": {}, "rng": {}}], ids=repr
)
def test_snapshot_tree_without_its_parts_is_refused(tree):
    """A tree lacking the state, RNGs or history is an IncompatibleSnapshotError."""
    with pytest.raises(IncompatibleSnapshotError, match="lacks"):
        decode_snapshot(Small(), tree, [])


# Property: state -> snapshot -> state is the identity.

PROPERTY_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int64,
    torch.complex64,
]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Draw a small tensor of any dtype and shape, of arbitrary bits."""
    dtype = draw(st.sampled_from(PROPERTY_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    count = math.prod(shape)
    if dtype == torch.bool:
        flags = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        tensor = torch.tensor(flags, dtype=torch.bool).reshape(shape)
    elif count == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        size = count * dtype.itemsize
        raw = draw(st.binary(min_size=size, max_size=size))
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        tensor = flat.view(dtype).reshape(shape).clone()
    if len(shape) >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)

    return tensor


ARRAY_DTYPES = ["<f8", "<f4", "<i4", "|u1", "|b1", "<c16", ">i2"]
arrays: st.SearchStrategy[np.ndarray] = hnp.arrays(
    dtype=st.sampled_from([np.dtype(name) for name in ARRAY_DTYPES]),
    shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3),
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
values = st.recursive(
    json_scalars | tensors() | arrays,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3)
    ),
    max_leaves=8,
)
histories = st.lists(
    st.none()
    | st.dictionaries(st.text(max_size=4), st.floats(allow_nan=False), max_size=2),
    max_size=3,
)


def blank(value: Any) -> Any:
    """Return a value of the same shape as ``value``, its data zeroed or None."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, np.ndarray):
        return np.zeros_like(value)
    if isinstance(value, list | tuple):
        return type(value)(blank(item) for item in value)
    if isinstance(value, dict):
        return {key: blank(item) for key, item in value.items()}
    return None


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    fields=st.lists(values, min_size=1, max_size=4),
    history=histories,
    into_blank=st.booleans(),
)
def test_state_snapshot_state_is_the_identity(fields, history, into_blank):
    """Any generated attrs state decodes, from its snapshot, to an equal state."""
    cls = attrs.make_class("Generated", [f"f{i}" for i in range(len(fields))])
    state = cls(*fields)
    content = through_layout(encode_snapshot(state, history))
    target = cls(*(blank(v) if into_blank else None for v in fields))

    restored_history = decode_snapshot(target, *content)

    assert [] == diff_states(state, target)
    assert history == restored_history
