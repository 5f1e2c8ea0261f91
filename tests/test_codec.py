"""
Tests of ``resumable._codec``: each kind of value round-trips exactly, through JSON
and the snapshot's real buffer layout, and is restored in place where it can be.
"""

from __future__ import annotations

import json
import random
import threading
from collections import OrderedDict
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from torch import nn

import resumable
from resumable._codec import Decoder, Encoder
from resumable._snapshot import buffer_table, buffer_views, data_chunks
from resumable.errors import IncompatibleSnapshotError, StateDefinitionError


def encode(value: Any, path: str = "state.value") -> tuple[dict[str, Any], list[Any]]:
    """Encode one value and pass its node and buffers through the on-disk layout."""
    encoder = Encoder()
    node = encoder.encode(value, path)
    index = json.dumps({"tree": node, "buffers": buffer_table(encoder.buffers)})
    data = bytearray(b"".join(bytes(chunk) for chunk in data_chunks(encoder.buffers)))
    parsed = json.loads(index)

    return parsed["tree"], buffer_views(memoryview(data), parsed["buffers"])


def round_trip(value: Any, current: Any = None, path: str = "state.value") -> Any:
    """Encode ``value`` and decode it into ``current``, as a resume does."""
    node, buffers = encode(value, path)

    return Decoder(buffers).decode(node, current, path)


def bits(tensor: torch.Tensor) -> list[int]:
    """Return the raw bytes of a tensor, so that NaNs and -0.0 compare exactly."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).tolist()


def assert_same_tensor(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert (expected.dtype, expected.shape) == (actual.dtype, actual.shape)
    assert bits(expected) == bits(actual)


def assert_same_array(expected: np.ndarray, actual: np.ndarray) -> None:
    assert (expected.dtype, expected.shape) == (actual.dtype, actual.shape)
    assert expected.tobytes() == actual.tobytes()


TENSOR_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.complex64,
    torch.complex128,
]


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    """Return a tensor of ``dtype`` with distinct, non-zero-looking values."""
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 50
    if dtype == torch.bool:
        return values > 0
    if dtype.is_complex:
        return torch.complex(values, -values).to(dtype)

    return values.to(dtype)


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
def test_tensor_of_each_dtype_round_trips_bit_exactly_into_a_new_tensor(dtype):
    """A tensor of any dense dtype decodes, with no live target, to the same bits."""
    original = sample_tensor(dtype)

    restored = round_trip(original)

    assert_same_tensor(original, restored)


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
def test_tensor_of_each_dtype_is_restored_in_place(dtype):
    """A tensor decodes into the live tensor that init() built, not a new one."""
    original = sample_tensor(dtype)
    current = torch.zeros_like(original)

    restored = round_trip(original, current)

    assert restored is current
    assert_same_tensor(original, current)


@pytest.mark.parametrize(
    "original",
    [
        torch.tensor(3.5),
        torch.tensor(True),
        torch.zeros(0),
        torch.zeros(2, 0, 3, dtype=torch.bfloat16),
        torch.arange(12.0).reshape(3, 4).t(),
        torch.arange(20, dtype=torch.int16)[::3],
        torch.arange(24.0).reshape(2, 3, 4)[:, 1:, ::2],
        torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
    ],
    ids=[
        "0-dim",
        "0-dim-bool",
        "zero-size",
        "zero-size-3d",
        "transposed",
        "strided",
        "sliced-3d",
        "non-finite",
    ],
)
def test_tensor_shapes_and_views_round_trip_exactly(original):
    """0-dim, zero-size and non-contiguous tensors keep their values and shape."""
    restored = round_trip(original)

    assert_same_tensor(original, restored)


def test_tensor_is_restored_into_a_non_contiguous_live_view():
    """Decoding into a view writes through to the tensor it views."""
    original = torch.arange(4.0) + 1
    base = torch.zeros(4, 4)
    current = base[:, 2]

    restored = round_trip(original, current)

    assert restored is current
    assert [1.0, 2.0, 3.0, 4.0] == base[:, 2].tolist()
    assert 0.0 == float(base[:, :2].abs().sum() + base[:, 3:].abs().sum())


def test_tensor_with_other_shape_than_the_live_one_is_replaced():
    """A live tensor of another shape is not written into; a new one is made."""
    original = torch.arange(6.0)
    current = torch.zeros(3)

    restored = round_trip(original, current)

    assert restored is not current
    assert_same_tensor(original, restored)
    assert [0.0, 0.0, 0.0] == current.tolist()


def test_parameter_and_requires_grad_survive_without_a_live_target():
    """A Parameter decodes to a Parameter, and requires_grad is kept."""
    parameter = nn.Parameter(torch.arange(3.0))
    leaf = torch.ones(2, requires_grad=True)

    restored_parameter = round_trip(parameter)
    restored_leaf = round_trip(leaf)

    assert isinstance(restored_parameter, nn.Parameter)
    assert restored_parameter.requires_grad
    assert_same_tensor(parameter, restored_parameter)
    assert restored_leaf.requires_grad
    assert not isinstance(restored_leaf, nn.Parameter)


NUMPY_ARRAYS: dict[str, np.ndarray] = {
    "float64": np.linspace(-1, 1, 7),
    "float16": np.arange(5, dtype=np.float16) / 3,
    "int8": np.arange(-4, 4, dtype=np.int8),
    "uint64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "bool": np.array([True, False, True]),
    "complex64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "big-endian": np.arange(4, dtype=">i4"),
    "unicode": np.array(["a", "bcd", ""]),
    "bytes": np.array([b"x", b"yz"]),
    "datetime": np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    "0-dim": np.array(2.5),
    "zero-size": np.zeros((0, 3), dtype=np.int32),
    "2d-fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "strided-view": np.arange(10.0)[::3],
    "non-finite": np.array([np.nan, np.inf, -np.inf, -0.0]),
}


@pytest.mark.parametrize("name", sorted(NUMPY_ARRAYS))
def test_numpy_array_round_trips_exactly(name):
    """A numpy array of a plain dtype keeps its dtype, shape and bytes."""
    original = NUMPY_ARRAYS[name]

    restored = round_trip(original)

    assert_same_array(original, restored)


def test_numpy_array_is_restored_in_place():
    """An array decodes into the live array of the same dtype and shape."""
    original = np.arange(6.0).reshape(2, 3)
    current = np.zeros((2, 3))

    restored = round_trip(original, current)

    assert restored is current
    assert_same_array(original, current)


def test_structured_numpy_array_round_trips():
    """A structured array (pickled: it has no plain dtype string) keeps its fields."""
    dtype = np.dtype([("id", "<i4"), ("score", "<f8"), ("tag", "<U3")])
    original = np.array([(1, 0.5, "ab"), (2, np.nan, "xyz")], dtype=dtype)

    node, _ = encode(original)
    restored = round_trip(original)

    assert "pickle" == node["k"]
    assert_same_array(original, restored)


def test_object_numpy_array_is_pickled_and_round_trips():
    """An object array is pickled, and its items come back equal."""
    original = np.array([1, "two", None, [3.0]], dtype=object)

    node, _ = encode(original)
    restored = round_trip(original)

    assert "pickle" == node["k"]
    assert original.tolist() == restored.tolist()
    assert object == restored.dtype


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937])
def test_numpy_generator_is_restored_in_place(bit_generator):
    """An np.random.Generator gets the snapshot's state in the live object."""
    original = np.random.Generator(bit_generator(1234))
    original.random(5)
    current = np.random.Generator(bit_generator(99))

    restored = round_trip(original, current)

    assert restored is current
    assert original.random(8).tolist() == current.random(8).tolist()


def test_numpy_generator_of_another_bit_generator_is_replaced():
    """A live Generator with another bit generator is replaced by the right kind."""
    original = np.random.Generator(np.random.MT19937(5))
    current = np.random.Generator(np.random.PCG64(5))

    restored = round_trip(original, current)

    assert "MT19937" == type(restored.bit_generator).__name__
    assert (
        original.integers(0, 2**62, 6).tolist()
        == restored.integers(0, 2**62, 6).tolist()
    )


def test_numpy_random_state_is_restored_in_place():
    """An np.random.RandomState, Gaussian cache included, is restored in place."""
    original = np.random.RandomState(3)
    original.standard_normal()  # leaves a cached Gaussian in the state
    current = np.random.RandomState(4)

    restored = round_trip(original, current)

    assert restored is current
    assert original.standard_normal(5).tolist() == current.standard_normal(5).tolist()


def test_python_random_is_restored_in_place():
    """A random.Random is restored in place, Gaussian cache included."""
    original = random.Random(11)
    original.gauss(0, 1)
    current = random.Random(12)

    restored = round_trip(original, current)

    assert restored is current
    expected = [original.gauss(0, 1), original.random(), original.getrandbits(70)]
    assert expected == [current.gauss(0, 1), current.random(), current.getrandbits(70)]


def test_torch_generator_is_restored_in_place_under_a_loader_that_holds_it():
    """A DataLoader holding the live generator shuffles as the snapshot's would."""
    original = torch.Generator().manual_seed(5)
    torch.rand(3, generator=original)
    current = torch.Generator().manual_seed(6)
    items = torch.utils.data.TensorDataset(torch.arange(10))
    loader = torch.utils.data.DataLoader(
        items, batch_size=1, shuffle=True, generator=current
    )
    reference = torch.utils.data.DataLoader(
        items, batch_size=1, shuffle=True, generator=original
    )

    restored = round_trip(original, current)

    assert restored is current
    assert loader.generator is current
    assert [int(x) for (x,) in reference] == [int(x) for (x,) in loader]


def test_module_is_restored_in_place_with_training_flags():
    """A module's weights load into the live module; parameters keep identity."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    original(torch.randn(5, 4))  # moves the BatchNorm running statistics
    original[1].eval()
    current = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    parameters = list(current.parameters())

    restored = round_trip(original, current)

    assert restored is current
    assert all(
        before is after
        for before, after in zip(parameters, current.parameters(), strict=True)
    )
    for name, tensor in original.state_dict().items():
        assert_same_tensor(tensor, current.state_dict()[name])
    assert [m.training for m in original.modules()] == [
        m.training for m in current.modules()
    ]


def test_module_with_other_keys_is_refused_with_the_key_diff():
    """Loading a snapshot into a module of other structure names the keys."""
    original = nn.Linear(3, 2)
    current = nn.Sequential(nn.Linear(3, 2))

    with pytest.raises(IncompatibleSnapshotError) as caught:
        round_trip(original, current, "state.model")

    message = str(caught.value)
    assert "state.model" in message
    assert "0.weight" in message
    assert "Missing key" in message
    assert "Unexpected key" in message


def test_module_with_other_shapes_is_refused_naming_the_parameter():
    """Loading a snapshot into a module of other sizes names the parameter."""
    original = nn.Linear(3, 2)
    current = nn.Linear(3, 5)

    with pytest.raises(IncompatibleSnapshotError) as caught:
        round_trip(original, current, "state.model")

    message = str(caught.value)
    assert "size mismatch" in message
    assert "weight" in message


def test_module_snapshot_into_a_non_module_is_refused():
    """A module's state cannot be restored where init() built something else."""
    with pytest.raises(IncompatibleSnapshotError, match=r"state\.model"):
        round_trip(nn.Linear(2, 2), None, "state.model")


def test_optimizer_moments_are_loaded_into_the_live_optimizer():
    """Adam's step counts and moments are restored into the optimizer init() built."""
    torch.manual_seed(1)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    fresh_model = nn.Linear(3, 1)
    current = torch.optim.Adam(fresh_model.parameters(), lr=0.5)

    restored = round_trip(optimizer, current)

    assert restored is current
    assert 0.1 == current.param_groups[0]["lr"]
    assert current.param_groups[0]["params"][0] is fresh_model.weight
    for parameter, fresh in zip(
        model.parameters(), fresh_model.parameters(), strict=True
    ):
        expected, actual = optimizer.state[parameter], current.state[fresh]
        assert sorted(expected) == sorted(actual)
        for key in expected:
            assert_same_tensor(expected[key], actual[key])


def test_lr_scheduler_is_restored_in_place():
    """A scheduler's position is restored, so the next steps give the same rates."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    fresh_optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    current = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=2, gamma=0.5)

    restored = round_trip(scheduler, current)
    fresh_optimizer.load_state_dict(optimizer.state_dict())

    assert restored is current
    assert scheduler.state_dict() == current.state_dict()
    expected, actual = [], []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        fresh_optimizer.step()
        current.step()
        expected.append(scheduler.get_last_lr())
        actual.append(current.get_last_lr())
    assert expected == actual


class Counter:
    """A user object with its own state_dict protocol."""

    def __init__(self) -> None:
        self.count = 0
        self.loads = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]
        self.loads += 1


def test_user_object_with_state_dict_is_loaded_in_place():
    """An object with state_dict()/load_state_dict() is loaded, not pickled."""
    original = Counter()
    original.count = 41
    current = Counter()

    node, _ = encode(original)
    restored = round_trip(original, current)

    assert "stateful" == node["k"]
    assert restored is current
    assert (41, 1) == (current.count, current.loads)


class Point:
    """A plain user class with neither attrs nor state_dict: it gets pickled."""

    def __init__(self, x: int, tags: list[str]) -> None:
        self.x = x
        self.tags = tags


def test_plain_user_object_is_pickled_and_round_trips():
    """A plain user object is captured with cloudpickle and comes back equal."""
    original = Point(3, ["a", "b"])

    node, _ = encode(original)
    restored = round_trip(original)

    assert "pickle" == node["k"]
    assert isinstance(restored, Point)
    assert vars(original) == vars(restored)


@pytest.mark.parametrize(
    "original",
    [
        None,
        True,
        0,
        -(2**100),
        2**127 + 1,
        1.5,
        -0.0,
        "text with \u00e9\u2603 and \n",
        [],
        {},
        (),
        [1, "a", None, [2.5, []]],
        {"a": {"b": [1, 2]}, "": None},
        (1, "a", (None, 2.0)),
        {1: "one", -2: "minus two", 2**70: "big"},
        {(1, 2): "pair", ("a", (3,)): [4]},
        {1: "int", "1": "str", False: "bool"},
        [(1, 2), {"k": (3,)}],
    ],
    ids=repr,
)
def test_plain_values_and_containers_round_trip_equal_with_their_types(original):
    """Scalars, big ints and nested containers come back equal, types and all."""
    restored = round_trip(original)

    assert original == restored
    assert repr(original) == repr(restored)


def test_non_finite_floats_round_trip():
    """NaN and infinities survive, also inside containers."""
    original = {"values": [float("nan"), float("inf"), -float("inf")]}

    restored = round_trip(original)

    values = restored["values"]
    assert values[0] != values[0]
    assert [float("inf"), -float("inf")] == values[1:]


def test_ordered_dict_keeps_its_type_and_order():
    """An OrderedDict comes back as an OrderedDict in the same order."""
    original: OrderedDict[str, Any] = OrderedDict(
        [("z", 1), ("a", torch.ones(2)), ("m", [3])]
    )

    restored = round_trip(original)

    assert OrderedDict is type(restored)
    assert ["z", "a", "m"] == list(restored)
    assert_same_tensor(original["a"], restored["a"])


def test_dict_of_tensors_is_raw_data_and_restored_in_place():
    """A dict of tensors is stored as raw tensors, each loaded into the live one."""
    original = {"w": torch.arange(3.0), 7: torch.ones(2, dtype=torch.int64)}
    current = {"w": torch.zeros(3), 7: torch.zeros(2, dtype=torch.int64)}
    live_w, live_7 = current["w"], current[7]

    node, _ = encode(original)
    restored = round_trip(original, current)

    assert "dict" == node["k"]
    assert ["tensor", "tensor"] == [value["k"] for _, value in node["items"]]
    assert restored is current
    assert current["w"] is live_w
    assert current[7] is live_7
    assert_same_tensor(original["w"], current["w"])
    assert_same_tensor(original[7], current[7])


def test_list_is_refilled_in_place_and_tuple_items_keep_identity():
    """A live list is refilled in place; tensors inside a tuple are loaded in place."""
    original = [1, torch.arange(2.0), (torch.ones(1), "x")]
    inner = torch.zeros(2)
    in_tuple = torch.zeros(1)
    current: list[Any] = [0, inner, (in_tuple, "y")]

    restored = round_trip(original, current)

    assert restored is current
    assert restored[1] is inner
    assert restored[2][0] is in_tuple
    assert [1, [0.0, 1.0], ([1.0], "x")] == [
        restored[0],
        restored[1].tolist(),
        (restored[2][0].tolist(), restored[2][1]),
    ]


@attrs.define
class Inner:
    weights: torch.Tensor
    history: list[float] = attrs.Factory(list)
    cache: object = resumable.transient(default="fresh")


@attrs.frozen
class FrozenInner:
    name: str
    values: tuple[int, ...]


@attrs.define
class Outer:
    inner: Inner
    frozen: FrozenInner
    children: list[Inner] = attrs.Factory(list)


def make_outer(scale: float, cache: str) -> Outer:
    return Outer(
        inner=Inner(torch.full((2,), scale), [scale], cache),
        frozen=FrozenInner(f"n{scale}", (int(scale),)),
        children=[Inner(torch.full((1,), -scale), [], cache)],
    )


def test_nested_and_frozen_attrs_round_trip_in_place():
    """Nested attrs instances, frozen ones too, are restored field by field."""
    original = make_outer(2.0, "snapshotted")
    current = make_outer(0.0, "from init")
    inner, weights = current.inner, current.inner.weights

    restored = round_trip(original, current)

    assert restored is current
    assert current.inner is inner
    assert current.inner.weights is weights
    assert_same_tensor(original.inner.weights, current.inner.weights)
    assert [2.0] == current.inner.history
    assert FrozenInner("n2.0", (2,)) == current.frozen
    assert_same_tensor(original.children[0].weights, current.children[0].weights)


def test_transient_fields_are_not_captured_and_keep_the_live_value():
    """A transient field is absent from the snapshot and keeps init()'s value."""
    original = make_outer(1.0, "snapshotted")
    current = make_outer(0.0, "from init")

    node, _ = encode(original)
    round_trip(original, current)

    assert ["history", "weights"] == sorted(node["fields"]["inner"]["fields"])
    assert "from init" == current.inner.cache
    assert "from init" == current.children[0].cache


def test_attrs_snapshot_into_another_class_is_refused():
    """An attrs node restores only into an instance of the same class."""
    with pytest.raises(IncompatibleSnapshotError, match="FrozenInner"):
        round_trip(FrozenInner("a", ()), Inner(torch.zeros(1)), "state.part")


@pytest.mark.parametrize(
    ("make_value", "path"),
    [
        (lambda handle: {"lock": threading.Lock()}, "state.extra['lock']"),
        (lambda handle: {"log": handle}, "state.extra['log']"),
        (lambda handle: [1, threading.Lock()], "state.extra[1]"),
        (
            lambda handle: {3: {"deep": [threading.RLock()]}},
            "state.extra[3]['deep'][0]",
        ),
    ],
    ids=["lock", "open-file", "lock-in-list", "nested"],
)
def test_value_that_cannot_be_pickled_names_its_path_and_the_remedy(
    tmp_path, make_value, path
):
    """An un-picklable value raises StateDefinitionError naming where it is."""
    with open(tmp_path / "log.txt", "w") as handle:
        value = make_value(handle)

        with pytest.raises(StateDefinitionError) as caught:
            Encoder().encode(value, "state.extra")

    message = str(caught.value)
    assert f"Cannot snapshot {path}:" in message
    assert "resumable.transient()" in message


def test_unknown_node_kind_is_refused():
    """A node of an unknown kind is an IncompatibleSnapshotError, not a crash."""
    with pytest.raises(IncompatibleSnapshotError, match="'martian'"):
        Decoder([]).decode({"k": "martian"}, None, "state.x")
